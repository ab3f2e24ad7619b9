"""Attribution patching and last-position metrics: what each saves, against the exact sweep and
TransformerLens, in one process.

On SmolLM2-135M-Instruct (``--model`` takes any name ``residkit.load`` takes), the IOI-style
pair of ``benchmarks/patching.py`` cut to 128 tokens, metric the logit difference of " Mary"
over " John" at the last position. For each hook point:

- ``exact_s``: ``patching_sweep`` over the sweep positions of ``benchmarks/patching.py`` (every
  position would take many minutes on 2 cores), ``exact_cells`` cells;
- ``last_only_s``: the same sweep with ``metric_positions=[-1]`` (the unembedding runs at the
  last position only);
- ``attribution_s``: ``attribution_sweep`` over *every* position (``attribution_cells``);
- ``tl_s``: TransformerLens's ``get_act_patch_*`` on one cell per layer, its time per patched
  run times ``exact_cells`` (as ``benchmarks/patching.py`` does);
- ratios, per cell so that sweeps over different cell counts compare: ``attribution_x`` is the
  exact sweep's seconds per cell over attribution's, ``last_only_vs_tl`` TL's over
  ``metric_positions=[-1]``'s.

Run: ``python benchmarks/attribution.py [--tokens 128] [--hooks resid_pre ...]``. Exits 1 if,
for resid_pre, attribution is under 20x per cell or ``metric_positions=[-1]`` under 5x TL.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from patching import pair, positions_for, sample, tl_sweep

import residkit
from residkit.patching import HOOKS


def timed(call, *args, **kwargs):
    start = time.perf_counter()
    out = call(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hooks", nargs="+", default=list(HOOKS), choices=HOOKS)
    args = parser.parse_args()
    print(
        f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {os.getloadavg()[0]:.2f}; model {args.model}, {args.tokens} tokens"
    )
    model = residkit.load(args.model)
    clean, corrupted, mary, john = pair(model, args.tokens)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        # A scalar for one prompt pair, as TransformerLens's patching functions require.
        return (logits[:, -1, mary] - logits[:, -1, john]).sum()

    _, clean_cache = model.run_with_cache(clean)
    rows, ok = [], True
    for hook in args.hooks:
        positions = positions_for(hook, args.tokens)
        kw = {"hook": hook, "positions": positions, "progress": False}
        sweep = residkit.patching_sweep
        exact, exact_s = timed(sweep, model, clean, corrupted, metric, **kw)
        last, last_s = timed(sweep, model, clean, corrupted, metric, metric_positions=[-1], **kw)
        est, est_s = timed(residkit.attribution_sweep, model, clean, corrupted, metric, hook=hook)
        index_df = sample(model, hook, positions)
        _, tl_sample_s = timed(tl_sweep, hook, model, corrupted, clean_cache, metric, index_df)
        cells, est_cells = exact.values.numel(), est.values.numel()
        tl_s = tl_sample_s / len(index_df) * cells
        scale = exact.values.abs().max().item()
        agree = (last.values - exact.values).abs().max().item() <= 1e-4 * max(scale, 1e-30)
        row = {
            "hook": hook,
            "exact_cells": cells,
            "exact_s": round(exact_s, 1),
            "last_only_s": round(last_s, 1),
            "tl_s": round(tl_s, 1),
            "attribution_cells": est_cells,
            "attribution_s": round(est_s, 2),
            "attribution_x": round((exact_s / cells) / (est_s / est_cells), 1),
            "last_only_vs_exact": round(exact_s / last_s, 2),
            "last_only_vs_tl": round(tl_s / last_s, 1),
            "last_only_agrees": agree,
        }
        ok &= agree
        if hook == "resid_pre":
            ok &= row["attribution_x"] >= 20 and row["last_only_vs_tl"] >= 5
        rows.append(row)
        print(pd.DataFrame([row]).to_string(index=False, header=len(rows) == 1), flush=True)
    table = pd.DataFrame(rows)
    print("\n| " + " | ".join(table.columns) + " |")
    print("|" + "---|" * len(table.columns))
    for r in table.itertuples(index=False):
        print("| " + " | ".join(str(v) for v in r) + " |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
