"""Section ``kvdirect``: KV-Direct vs the full cache, two budgets, exact and fast modes."""

from __future__ import annotations

import torch
from transformer_lens.model_bridge import TransformerBridge

from residkit.checks.base import NEW_TOKENS, Check, VerifyContext
from residkit.generation import generate
from residkit.policies import KVDirect
from residkit.policies.kvdirect import KVDIRECT_MODES


def run(model: TransformerBridge, ctx: VerifyContext) -> list[Check]:
    prompt, n_new = ctx.prompts[1], NEW_TOKENS
    full = ctx.shared(model).reference
    assert full.logits is not None
    checks = []
    for budget in (4, 16):
        for mode in KVDIRECT_MODES:
            gen = generate(
                model,
                prompt,
                max_new_tokens=n_new,
                policy=KVDirect(budget, "layer", mode, measure_deviation=mode == "fast"),
                return_logits=True,
                stop_at_eos=False,
            )
            assert gen.logits is not None
            same = torch.equal(gen.tokens, full.tokens)
            tokens = f"tokens {'equal' if same else 'DIFFER'}"
            if mode == "exact":
                ok = same and torch.equal(gen.logits, full.logits)
                detail = f"{tokens}, logits bitwise: {ok}"
            else:
                ok = same
                detail = f"{tokens}, max |dlogit| {gen.stats.max_logit_deviation:.2g}"
            ratio = gen.stats.peak_active_kv_bytes / full.stats.peak_active_kv_bytes
            checks.append(
                Check(
                    "kvdirect",
                    f"KV-Direct budget={budget} mode={mode} == full cache ({n_new} tokens)",
                    f"{detail}; peak active K/V {ratio:.2f}x full",
                    ok,
                )
            )
    return checks
