"""Decode throughput by batch size: FullCache against KV-Direct's plans, in one process.

For each batch size, ``batch`` copies of one long prompt (no padding, so every row does the
same work) are prefilled, then ``--new`` tokens decoded greedily. Decode tokens/s counts every
row's tokens (``batch x new / decode seconds``); prefill is timed apart. Each policy's number is
also given as a ratio to FullCache at the same batch, and to its own batch-1 tokens/s (where
batching stops paying, that ratio stops growing). Runs alternate between policies, and the
median of ``--runs`` is kept, so drift on a shared machine hits each alike.

Run: ``python benchmarks/throughput.py [--model smollm2-135m-instruct] [--batches 1 4 16]``;
``--tiny`` runs the zoo llama in seconds (a smoke run). ``--device cuda`` runs on a GPU
(``benchmarks/gpu.py`` calls :func:`measure`).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import residkit
from residkit.generation.engine import next_logits
from residkit.policies import CachePolicy, FullCache, KVDirect
from residkit.reproduction.prompts import prompt_set


def plans(budget: int, n_layers: int) -> dict[str, CachePolicy]:
    """FullCache and KV-Direct's three checkpoint plans at ``budget``."""
    return {
        "full": FullCache(),
        "kvdirect-layer": KVDirect(budget),
        "kvdirect-stride": KVDirect(budget, checkpoint="stride", stride=max(2, n_layers // 4)),
        "kvdirect-token": KVDirect(budget, checkpoint="token"),
    }


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@torch.no_grad()
def decode_once(model, policy: CachePolicy, ids: torch.Tensor, new: int) -> tuple[float, float]:
    """Seconds of the prefill and of ``new - 1`` decode forwards (greedy) under ``policy``."""
    sync = _sync(ids.device)
    with policy.make_cache(model) as cache:
        sync()
        start = time.perf_counter()
        logits = next_logits(model, ids, cache)
        sync()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new - 1):
            logits = next_logits(model, logits.argmax(-1, keepdim=True), cache)
        sync()
    return prefill, time.perf_counter() - start


def measure(
    model,
    policies: dict[str, CachePolicy],
    batches: Sequence[int],
    context: int,
    new: int,
    runs: int,
) -> list[dict[str, Any]]:
    """One record per (batch, policy): median prefill and decode times, tokens/s, ratios."""
    one = prompt_set(model, 1, tokens=context)[0][1][:, :context]
    device = next(model.parameters()).device
    rows = []
    for batch in batches:
        ids = one.expand(batch, -1).contiguous().to(device)
        decode_once(model, FullCache(), ids, 2)  # warm-up: allocator, kernels
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in policies}
        for _ in range(runs):
            for name, policy in policies.items():
                times[name].append(decode_once(model, policy, ids, new))
        for name in policies:
            prefill = statistics.median(t[0] for t in times[name])
            decode = statistics.median(t[1] for t in times[name])
            rows.append(
                {
                    "batch": batch,
                    "policy": name,
                    "context": int(one.shape[1]),
                    "prefill_s": prefill,
                    "decode_step_ms": 1000 * decode / max(new - 1, 1),
                    "decode_tokens_per_s": batch * (new - 1) / decode,
                }
            )
    for row in rows:
        full = next(r for r in rows if r["batch"] == row["batch"] and r["policy"] == "full")
        first = next(r for r in rows if r["policy"] == row["policy"] and r["batch"] == batches[0])
        row["vs_full"] = row["decode_tokens_per_s"] / full["decode_tokens_per_s"]
        row["vs_own_batch_1"] = row["decode_tokens_per_s"] / first["decode_tokens_per_s"]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tiny", action="store_true", help="the zoo llama (smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--context", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=9, help="tokens decoded per row")
    parser.add_argument("--budget", type=int, default=32, help="KV-Direct's budget")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    if args.tiny:
        args.model, args.batches, args.context, args.new, args.runs = "zoo:llama", [1, 2], 32, 4, 1
        args.budget = 8
    model = residkit.load(args.model, device=args.device)
    print(
        f"# {args.model} on {args.device}: {datetime.date.today()}, {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"context {args.context}, {args.new} new tokens per row, budget {args.budget}, median of "
        f"{args.runs}\n"
    )
    rows = measure(
        model, plans(args.budget, model.cfg.n_layers), args.batches, args.context, args.new,
        args.runs,
    )  # fmt: skip
    print("| batch | policy | decode tokens/s | step ms | vs FullCache | vs own batch 1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['policy']} | {r['decode_tokens_per_s']:.1f} | "
            f"{r['decode_step_ms']:.1f} | {r['vs_full']:.2f}x | {r['vs_own_batch_1']:.2f}x |"
        )
    layer = [r for r in rows if r["policy"] == "kvdirect-layer"]
    gains = [(a["batch"], b["batch"], b["decode_tokens_per_s"] / a["decode_tokens_per_s"])
             for a, b in itertools.pairwise(layer)]  # fmt: skip
    for small, big, gain in gains:
        print(f"kvdirect-layer: batch {small} -> {big}: {gain:.2f}x tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
