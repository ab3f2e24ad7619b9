"""Section ``qk_spectra``: factored SVD == explicit SVD, a GQA negative control, ranks."""

from __future__ import annotations

import torch
from transformer_lens.model_bridge import TransformerBridge

from residkit.checks.base import Check, VerifyContext
from residkit.spectra import explicit_qk_svdvals, qk_spectra


@torch.no_grad()
def run(model: TransformerBridge, ctx: VerifyContext) -> list[Check]:
    spectra = qk_spectra(model)
    n_layers, n_heads, n_kv = spectra.n_layers, spectra.n_heads, spectra.n_kv_heads
    group = n_heads // n_kv

    def rel_diff(layer: int, head: int, kv_head: int) -> float:
        attn = model.blocks[layer].attn
        ref = explicit_qk_svdvals(attn.W_Q[head].detach(), attn.W_K[kv_head].detach())
        got = spectra.singular_values[layer, head]
        return float((got - ref).abs().max() / ref[0].clamp_min(1e-300))

    sample = sorted({(0, 0), (n_layers // 2, n_heads // 2), (n_layers - 1, n_heads - 1)})
    worst = max(rel_diff(layer, head, head // group) for layer, head in sample)
    rows = [
        Check(
            "qk_spectra",
            f"factored SVD == explicit SVD of W_Q W_K^T ({len(sample)} heads, float64)",
            f"max rel err {worst:.1e} (tolerance 1e-10)",
            worst < 1e-10,
        )
    ]
    # Negative control for the GQA mapping: h % n_kv is the usual mistake for h // group.
    misread = [h for h in range(n_heads) if h % n_kv != h // group]
    if misread:
        head = misread[0]
        diff = rel_diff(0, head, head % n_kv)
        rows.append(
            Check(
                "qk_spectra",
                f"negative control: head {head} paired with KV head {head % n_kv} "
                f"(h % n_kv) instead of {head // group} differs",
                f"max rel diff {diff:.1e}",
                diff > 1e-6,
            )
        )
    means = spectra.ranks(0.9).double().mean(dim=1).tolist()
    rows.append(
        Check(
            "qk_spectra",
            f"mean effective rank per layer at 90% energy (of d_head={spectra.d_head})",
            ", ".join(f"L{layer}: {m:.1f}" for layer, m in enumerate(means)),
            None,
            ctx.save(spectra.figure(energy=0.9), "qk_rank_heatmap"),
        )
    )
    return rows
