"""Every exact KV-Direct plan on the real models: bytes, recompute FLOPs, decode-step time.

For each model, :func:`residkit.kvdirect_frontier` with ``measure=True`` decodes the same
token ids to ``--context`` tokens under every plan (full cache, layer checkpoints, strides
with and without kept tops, token ids) and reports, beside the prediction from the config:

- bytes held, predicted and read from the tensors (they must be equal; the script exits 1 if
  not);
- recompute FLOPs per decoded token, predicted and counted by ``torch.utils.flop_counter``
  (GEMMs) over one step in fast mode, minus the full cache's count (the script exits 1 if they
  differ by more than 10%);
- the best decode-step time of ``--steps`` steps in exact mode over the full cache's, in the
  same process (``time_vs_full``);
- the Pareto front of bytes against measured time.

The paper's configs are printed computed only (no weights are built).

Run: ``python benchmarks/frontier.py [--context 1024] [--budget 64] [--steps 2]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import pandas as pd
import torch

import residkit
from residkit.zoo import PAPER_CONFIGS, config_for


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model", action="append")
    args = parser.parse_args()
    print(
        f"# {datetime.date.today()} {platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; context {args.context}, "
        f"budget {args.budget}"
    )
    ok = True
    for name in args.model or ["smollm2-135m-instruct", "gemma3-270m"]:
        model = residkit.load(name)
        f = residkit.kvdirect_frontier(
            model, context=args.context, budget=args.budget, measure=True, steps=args.steps
        )
        t = f.table
        t["MB"] = t["bytes"] / 1e6
        t["bytes_equal"] = t["bytes"] == t["measured_bytes"]
        t["flops_counted/predicted"] = t["counted_flops"] / t["recompute_flops"].where(
            t["recompute_flops"] > 0
        )
        t["GFLOP/token"] = t["recompute_flops"] / 1e9
        ratio = t["flops_counted/predicted"].dropna()
        ok &= bool(t["bytes_equal"].all()) and bool(((ratio - 1).abs() <= 0.1).all())
        columns = [
            "plan",
            "MB",
            "bytes_vs_full",
            "bytes_equal",
            "GFLOP/token",
            "flops_counted/predicted",
            "time_vs_full",
            "pareto",
        ]
        print(f"\n## {name}\n")
        with pd.option_context("display.width", 160, "display.max_rows", 200):
            print(t[columns].round(3).to_string(index=False))
    for key, entry in PAPER_CONFIGS.items():
        config = config_for(entry["family"], config=key)
        f = residkit.kvdirect_frontier(config, context=args.context, budget=args.budget)
        t = f.table
        front = t[t["pareto"]]
        shown = ", ".join(
            f"{r.plan} ({r.bytes_vs_full:.2f}x bytes, {r.recompute_flops / 1e9:.1f} GFLOP)"
            for r in front.itertuples()
        )
        print(f"\n{key} (computed): Pareto front: {shown}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
