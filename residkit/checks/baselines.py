"""Section ``baselines``: every eviction baseline and KV-Direct at budget 4, 12 tokens.

KV-Direct's row is a claim (100% token match, KL exactly 0.0); the baselines' rows are
information (how lossy each is on this model).
"""

from __future__ import annotations

from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import hook_count
from residkit.checks.base import Check, VerifyContext
from residkit.comparison import compare_policies


def run(model: TransformerBridge, ctx: VerifyContext) -> list[Check]:
    before = hook_count(model)
    cmp = compare_policies(model, ctx.prompts[1], budgets=[4], max_new_tokens=12, progress=False)
    figure = ctx.save(cmp.figure(), "eviction_vs_kvdirect")
    checks = []
    for row in cmp.table.itertuples():
        exact = row.token_match == 100.0 and row.mean_kl == 0.0 and row.max_kl == 0.0
        checks.append(
            Check(
                "baselines",
                f"{row.policy} budget={row.budget} vs full cache (12 tokens)",
                f"token match {row.token_match:.1f}%, mean KL {row.mean_kl:.3g}, "
                f"max KL {row.max_kl:.3g}",
                exact if row.policy == "kvdirect" else None,
                figure if row.policy == "kvdirect" else None,
            )
        )
    added = hook_count(model) - before
    checks.append(Check("baselines", "no hooks left on the model", f"{added} added", added == 0))
    return checks
