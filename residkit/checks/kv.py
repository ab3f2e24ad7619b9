"""Section ``kv``: K/V recomputed from residuals, exact and fast; decoding with no cache."""

from __future__ import annotations

import torch
from transformer_lens.model_bridge import TransformerBridge

from residkit.checks.base import NEW_TOKENS, Check, VerifyContext
from residkit.generation import generate
from residkit.reconstruction import kv_reconstruction_report


def run(model: TransformerBridge, ctx: VerifyContext) -> list[Check]:
    exact = kv_reconstruction_report(model, ctx.prompts[0], decode_steps=8)
    fast = kv_reconstruction_report(model, ctx.prompts[0], decode_steps=8, mode="fast")
    worst = max(fast.table[["k_cache_max_err", "v_cache_max_err"]].max())
    full = ctx.shared(model).reference
    none = generate(
        model, ctx.prompts[1], max_new_tokens=NEW_TOKENS, policy="none", stop_at_eos=False
    )
    n_equal = int((full.tokens == none.tokens).sum()) if len(full.tokens) == len(none.tokens) else 0
    layers_equal = int(exact.table[["k_cache_equal", "v_cache_equal"]].all(axis=1).sum())
    return [
        Check(
            "kv",
            "K/V from residuals == hooks and model cache (exact mode, bitwise)",
            f"{layers_equal}/{len(exact.rows)} layers bitwise over chunks "
            f"{exact.chunks[:1]}+{len(exact.chunks) - 1}x1",
            exact.passed,
            ctx.save(exact.figure(), "kv_exact"),
        ),
        Check(
            "kv",
            "fast recompute (one GEMM for all positions): max |error|",
            f"{worst:.3g} ({'bitwise' if fast.passed else 'not bitwise'})",
            None,
            ctx.save(fast.figure(), "kv_fast"),
        ),
        Check(
            "kv",
            f"greedy decoding with no cache == full cache ({NEW_TOKENS} tokens)",
            f"{n_equal}/{len(full.tokens)} tokens equal",
            torch.equal(full.tokens, none.tokens),
        ),
    ]
