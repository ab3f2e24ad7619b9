"""Section ``markov``: the Markov test at every layer on one cross-task pair."""

from __future__ import annotations

from transformer_lens.model_bridge import TransformerBridge

from residkit.checks.base import Check, VerifyContext
from residkit.markov import _patched_rows, markov_test


def run(model: TransformerBridge, ctx: VerifyContext) -> list[Check]:
    shared = ctx.shared(model)
    if shared.target is None or shared.target_logits is None:
        report = markov_test(model, ctx.prompts[0], ctx.prompts[1], align="right")
    else:
        # The source's capture run (residuals and logits) is the one the capture section used.
        layers = list(range(model.cfg.n_layers + 1))
        report = _patched_rows(
            model,
            shared.source,
            shared.target,
            layers,
            {layer: shared.resid[layer] for layer in layers},
            shared.logits,
            shared.target_logits,
        )
        report.align = "right"
    table = report.table
    return [
        Check(
            "markov",
            "patched logits == source logits, every layer (KL = 0.0)",
            f"{int(table['bitwise_equal'].sum())}/{len(table)} layers bitwise "
            f"({int((table['compared'] == 'final residual').sum())} by their final residual), "
            f"max KL {table['kl'].max():.3g}",
            report.passed,
            ctx.save(report.figure(), "markov"),
        ),
        Check(
            "markov",
            "control: unpatched target differs from source",
            f"KL(source || target) = {table['control_kl'].iloc[0]:.3f} nats",
            bool(table["control_kl"].iloc[0] > 0),
        ),
    ]
