"""One (policy, budget) cell of :func:`residkit.compare_policies`: its runs, readings and key."""

from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import hf_config
from residkit._cells import model_fingerprint
from residkit.comparison.result import summarise
from residkit.generation.engine import Generation
from residkit.metrics import kl_divergence
from residkit.policies.base import CachePolicy
from residkit.policies.full import FullCache

__all__ = ["key_parts", "run_cell"]


def _logits(gen: Generation) -> Tensor:
    assert gen.logits is not None
    return gen.logits


def _stack(rows: list[Generation]) -> Tensor:
    return torch.stack([r.tokens for r in rows])


def _step_rows(
    label: str,
    budget: int,
    prompt: int,
    ref: Generation,
    free: Generation,
    forced: list[Generation] | None,
    along: list[Generation] | None,
    j: int,
    own: bool,
) -> list[dict[str, object]]:
    """One row per decoded step of one prompt: token match and the KLs that were measured."""
    nan = [float("nan")] * len(free.tokens)
    teacher = nan if forced is None else kl_divergence(_logits(ref), _logits(forced[j])).tolist()
    free_kl = nan if along is None else kl_divergence(_logits(along[j]), _logits(free)).tolist()
    own_kl = kl_divergence(_logits(ref), _logits(free)).tolist() if own else nan
    match = (free.tokens == ref.tokens).tolist()
    return [
        {"policy": label, "budget": budget, "prompt": prompt, "step": t, "match": m, "kl": k,
         "free_kl": f, "own_kl": o}
        for t, (m, k, f, o) in enumerate(zip(match, teacher, free_kl, own_kl, strict=True))
    ]  # fmt: skip


def key_parts(
    model: TransformerBridge,
    groups: list[list[str | Tensor]],
    max_new_tokens: int,
    readings: tuple[str, ...],
    seed: int | None,
) -> dict[str, Any]:
    """What, beside the policy and budget, changes a cell's numbers."""
    import transformers

    param = next(model.parameters())
    return {
        "weights": model_fingerprint(model),
        "config": hf_config(model).to_dict(),
        "device": str(param.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),  # another thread count splits GEMMs otherwise
        "groups": groups,
        "max_new_tokens": max_new_tokens,
        "readings": readings,
        "seed": seed,
    }


def run_cell(
    label: str,
    budget: int,
    policy: CachePolicy,
    groups: list[list[str | Tensor]],
    ref: Callable[[int], list[Generation]],
    run: Callable[..., list[Generation]],
    readings: tuple[str, ...],
    bar: Any,
) -> tuple[dict[str, object], list[dict[str, object]]]:
    """One (policy, budget) cell over every group: its table row and its step rows."""
    peak_kv = peak_ckpt = peak_total = held = 0
    cell: list[dict[str, object]] = []
    first = 0
    for i, group in enumerate(groups):
        ref_rows = ref(i)
        # The full cache is the reference: its run is the reference run, decoded once.
        is_ref = isinstance(policy, FullCache) and policy == FullCache()
        free_rows = ref_rows if is_ref else run(group, policy)
        same = all(
            torch.equal(f.tokens, r.tokens) for f, r in zip(free_rows, ref_rows, strict=True)
        )
        # Same tokens fed means the same forwards: the free run is the forced run, and
        # the full cache along the policy's text is the reference itself.
        forced_rows = along_rows = None
        if "teacher" in readings:
            forced_rows = free_rows if same else run(group, policy, _stack(ref_rows))
        if "free" in readings:
            along_rows = ref_rows if same else run(group, "full", _stack(free_rows))
        for j, (r, free) in enumerate(zip(ref_rows, free_rows, strict=True)):
            cell += _step_rows(
                label, budget, first + j, r, free, forced_rows, along_rows, j, "own" in readings
            )
        stats = free_rows[0].stats  # the batch's; every row holds the same shapes
        peak_kv = max(peak_kv, stats.peak_active_kv_bytes // len(group))
        peak_ckpt = max(peak_ckpt, stats.peak_checkpoint_bytes // len(group))
        peak_total = max(peak_total, stats.peak_total_bytes // len(group))
        held = max(held, (stats.active_kv_bytes + stats.checkpoint_bytes) // len(group))
        first += len(group)
        bar.update(len(group))
    summary = {
        "policy": label,
        "budget": budget,
        **summarise(pd.DataFrame(cell), readings),
        "peak_active_kv_bytes": peak_kv,
        "peak_checkpoint_bytes": peak_ckpt,
        "peak_total_bytes": peak_total,
        "held_bytes": held,
    }
    return summary, cell
