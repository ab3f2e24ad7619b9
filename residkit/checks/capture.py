"""Section ``capture``: captured residuals equal TransformerLens's own cache, bitwise."""

from __future__ import annotations

import torch
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import hook_count
from residkit.architectures import spec_for
from residkit.checks.base import Check, VerifyContext
from residkit.viz.residual import residual_norm_figure


@torch.no_grad()
def run(model: TransformerBridge, ctx: VerifyContext) -> list[Check]:
    prompt = ctx.prompts[0]
    before = hook_count(model)
    shared = ctx.shared(model)
    resid = shared.resid
    _, cache = model.run_with_cache(shared.source)
    spec, n = spec_for(model), model.cfg.n_layers
    refs = [cache[spec.resid_hook(layer, n)] for layer in range(n + 1)]
    equal = [torch.equal(resid[layer], refs[layer]) for layer in range(n + 1)]
    # Negative control: the same comparison one layer off must see a difference.
    shifted = [not torch.equal(resid[layer], refs[layer + 1]) for layer in range(n)]
    fig = residual_norm_figure(resid, str_tokens=list(map(str, model.to_str_tokens(prompt))))
    added = hook_count(model) - before
    return [
        Check(
            "capture",
            "captured residuals == run_with_cache (bitwise, all layers)",
            f"{sum(equal)}/{n + 1} layers equal",
            all(equal),
            ctx.save(fig, "residual_norms"),
        ),
        Check(
            "capture",
            "negative control: layer l vs cache l+1 differs",
            f"{sum(shifted)}/{n} layers differ",
            all(shifted),
        ),
        Check("capture", "no hooks left on the model", f"{added} added", added == 0),
    ]
