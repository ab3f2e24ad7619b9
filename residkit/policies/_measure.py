"""Measuring plans on a model: bytes from the tensors, GEMM FLOPs counted, step time.

Used by :func:`residkit.kvdirect_frontier` with ``measure=True``. Every plan decodes the same
token ids to the same context, beside the full cache in the same run.

- **Bytes**: the session's active K/V and checkpoints after ``context`` tokens were fed.
- **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` over the last decoding step, in
  ``mode="fast"`` (one recompute of exactly the evicted tokens, what the formula counts),
  minus the full cache's count for the same step. It counts matrix products (linear layers,
  attention's two products), as the formula does; norms, rotary and softmax are not counted
  by either.
- **Time**: the best of ``steps`` decoding steps in exact mode, over the full cache's best.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from residkit.policies.base import CachePolicy
from residkit.policies.full import FullCache
from residkit.policies.kvdirect import KVDirect

__all__ = ["measure_plans"]


def _run(
    model: TransformerBridge, policy: CachePolicy, ids: torch.Tensor, steps: int, count: bool
) -> tuple[int, float, int]:
    """(bytes after the last step, best step seconds, GEMM FLOPs of the last step)."""
    from residkit.generation.engine import next_logits, prefill

    with policy.make_cache(model) as cache:
        logits = prefill(model, cache, ids[:, : ids.shape[1] - steps], policy.prefill_chunk_size)
        best, flops = float("inf"), 0
        for i in range(steps):
            token = ids[:, ids.shape[1] - steps + i :][:, :1]
            if count and i == steps - 1:
                with FlopCounterMode(display=False) as counter:
                    logits = next_logits(model, token, cache)
                flops = int(counter.get_total_flops())
            else:
                start = time.perf_counter()
                logits = next_logits(model, token, cache)
                best = min(best, time.perf_counter() - start)
        del logits
        held = cache.memory.active_kv_bytes + cache.memory.checkpoint_bytes
    return held, best, flops


@torch.no_grad()
def measure_plans(
    model: TransformerBridge,
    rows: list[dict[str, Any]],
    context: int,
    budget: int,
    steps: int,
    progress: bool,
    time_steps: bool = True,
) -> None:
    """Add ``measured_bytes``, ``counted_flops`` and (with ``time_steps``) ``step_seconds`` and
    ``time_vs_full`` to each row (rows carry their KVDirect arguments in ``_kwargs``)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.d_vocab, (1, context), generator=generator)
    steps = max(1, steps)
    full_bytes, full_time, full_flops = _run(model, FullCache(), ids, steps + 1, True)
    for row in tqdm(rows, desc="plans", disable=not progress):
        kw = row["_kwargs"]
        if kw is None:
            held, seconds, flops = full_bytes, full_time, full_flops
        else:
            held, _, flops = _run(model, KVDirect(budget, mode="fast", **kw), ids, 1, True)
            seconds = (
                _run(model, KVDirect(budget, **kw), ids, steps, False)[1] if time_steps else 0.0
            )
        row["measured_bytes"] = held
        row["counted_flops"] = flops - full_flops
        if time_steps:
            row["step_seconds"] = seconds
            row["time_vs_full"] = seconds / full_time
