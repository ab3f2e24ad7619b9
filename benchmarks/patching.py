"""Activation patching: residkit's batched ``patching_sweep`` against TransformerLens's functions.

On SmolLM2-135M-Instruct (real weights; ``--model`` takes any name ``residkit.load`` takes), an
IOI-style pair (clean: the story as written; corrupted: John and Mary swapped) cut to 32 and
128 tokens, metric the logit difference of " Mary" over " John" at the last position. For each
hook point, in one process:

- residkit: ``patching_sweep(..., hook=H)`` with the default plan, over the cells named in the
  ``cells`` column, run once before TL and once after (``before/after``); ``residkit_s`` is
  their mean, so drift over TL's minutes falls on both sides alike;
- the same sweep with ``reuse_prefix=False`` (whole runs from the patched layer, batched per
  layer), after: ``whole_runs_s`` and ``vs_whole_runs``, what the plan itself gains;
- TransformerLens: ``transformer_lens.patching.get_act_patch_*`` on the same bridge. The full
  sweep for ``resid_pre`` at 32 tokens (the reference row); elsewhere TL's full sweep would
  take up to hours, so it runs on a sample of cells (one per layer, positions spread, passed as
  ``index_df``) and its time for all of residkit's cells is the measured time per patched run
  times their count (``tl_extrapolated``);
- agreement: the largest |residkit - TL| over the cells TL ran, and over the largest |value|.

Run: ``python benchmarks/patching.py [--tokens 32 128] [--hooks resid_pre ...]``.
``python benchmarks/patching.py --attribution [...]`` runs ``benchmarks/attribution.py`` instead
(attribution patching and ``metric_positions=[-1]`` against this sweep and TL, 128 tokens).
The script exits 1 if resid_pre at 32 tokens is under 5x or any hook disagrees (with TL, or
between the two plans) by more than the tolerance stated in ``docs/patching.md`` (1e-4 of the
largest |value|).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import pandas as pd
import torch
from transformer_lens import patching as tl_patching

import residkit
from residkit.patching import HOOKS

STORY = (
    "It was a bright Saturday morning in the small town by the river, and the market square was "
    "already full of people, stalls and noise when the two friends set out from the old house. "
    "When Mary and John went to the store, John gave a drink to Mary. Later that evening, as "
    "they walked home along the river, Mary and John talked about the day. The shop had been "
    "busy, and John had waited in a long line while Mary looked for bread, apples and a small "
    "cake for her mother. At the corner they met an old friend, who asked Mary about her new job "
    "and John about his garden. After a while the friend left, and Mary and John walked on "
    "until they reached the bridge, where John stopped, looked at the water and handed the bag to"
)
TL_FUNCTIONS = {
    "resid_pre": tl_patching.get_act_patch_resid_pre,
    "resid_mid": tl_patching.get_act_patch_resid_mid,
    "attn_out": tl_patching.get_act_patch_attn_out,
    "mlp_out": tl_patching.get_act_patch_mlp_out,
    "z": tl_patching.get_act_patch_attn_head_out_by_pos,
}
TOLERANCE = 1e-4  # of the largest |value|: see docs/patching.md


def pair(model, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The last ``n_tokens`` of the story, and the same with the two names swapped."""
    mary, john = (model.tokenizer.encode(name)[0] for name in (" Mary", " John"))
    clean = model.to_tokens(STORY)[:, -n_tokens:]
    if clean.shape[1] < n_tokens:
        raise ValueError(f"the story has {clean.shape[1]} tokens, fewer than {n_tokens}")
    corrupted = torch.where(clean == mary, john, torch.where(clean == john, mary, clean))
    return clean, corrupted, mary, john


def positions_for(hook: str, n_tokens: int) -> list[int]:
    """Every position, except where the sweep would take many minutes on 2 cores."""
    if n_tokens <= 32 and hook != "z":
        return list(range(n_tokens))
    count = 16 if hook != "z" else (8 if n_tokens <= 32 else 4)
    step = n_tokens // count
    return list(range(step - 1, n_tokens, step))[:count]


def sample(model, hook: str, positions: list[int]) -> pd.DataFrame:
    """One cell per layer, positions (and heads) spread: TL's index_df."""
    n_heads = model.cfg.n_heads
    rows = []
    for layer in range(model.cfg.n_layers):
        pos = positions[(layer * 7) % len(positions)]
        rows.append((layer, pos, (layer * 5) % n_heads) if hook == "z" else (layer, pos))
    return pd.DataFrame(rows, columns=["layer", "pos", "head"] if hook == "z" else ["layer", "pos"])


def tl_sweep(hook, model, corrupted, clean_cache, metric, index_df=None) -> torch.Tensor:
    """TL's function for ``hook``; on the cells of ``index_df`` only when given (TL's partials
    fix the axes, so the sample goes to the generic function with the same setter)."""
    function = TL_FUNCTIONS[hook]
    if index_df is None:
        return function(model, corrupted, clean_cache, metric)
    kwargs = {k: v for k, v in function.keywords.items() if k != "index_axis_names"}
    return function.func(model, corrupted, clean_cache, metric, index_df=index_df, **kwargs)


def main() -> int:
    if "--attribution" in sys.argv:  # the same pair and sampling, another comparison
        from attribution import main as attribution

        sys.argv.remove("--attribution")
        return attribution()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--hooks", nargs="+", default=list(HOOKS), choices=HOOKS)
    args = parser.parse_args()
    print(
        f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {os.getloadavg()[0]:.2f}; model {args.model}"
    )
    model = residkit.load(args.model)
    rows, ok = [], True
    for n_tokens in args.tokens:
        clean, corrupted, mary, john = pair(model, n_tokens)

        def metric(logits: torch.Tensor, mary: int = mary, john: int = john) -> torch.Tensor:
            return logits[0, -1, mary] - logits[0, -1, john]

        _, clean_cache = model.run_with_cache(clean)
        for hook in args.hooks:
            positions = positions_for(hook, n_tokens)

            def ours(
                reuse_prefix: bool = True,
                hook: str = hook,
                positions: list[int] = positions,
                pair: tuple[torch.Tensor, torch.Tensor] = (clean, corrupted),
            ):
                start = time.perf_counter()
                sweep = residkit.patching_sweep(
                    model,
                    *pair,
                    metric,
                    hook=hook,
                    positions=positions,
                    reuse_prefix=reuse_prefix,
                    progress=False,
                )
                return sweep, time.perf_counter() - start

            # residkit runs before and after TL, and its time is their mean: the machine's
            # drift over TL's minutes then falls on both sides alike.
            sweep, before = ours()
            n_cells = sweep.values.numel()
            full = hook == "resid_pre" and n_tokens == 32
            index_df = None if full else sample(model, hook, positions)
            start = time.perf_counter()
            ref = tl_sweep(hook, model, corrupted, clean_cache, metric, index_df).cpu()
            tl_time = time.perf_counter() - start
            _, after = ours()
            whole, whole_time = ours(reuse_prefix=False)
            mean = (before + after) / 2
            if full:
                diff, tl_full = (sweep.values - ref).abs().max().item(), tl_time
            else:
                col = {p: j for j, p in enumerate(positions)}
                mine = torch.tensor(
                    [sweep.values[(r[0], col[r[1]], *r[2:])].item() for r in index_df.values]
                )
                diff = (mine - ref).abs().max().item()
                tl_full = tl_time / len(index_df) * n_cells
            scale = sweep.values.abs().max().item()
            ratio = tl_full / mean
            ok &= diff <= TOLERANCE * max(scale, 1e-30) and (not full or ratio >= 5)
            ok &= (whole.values - sweep.values).abs().max().item() <= TOLERANCE * max(scale, 1e-30)
            rows.append(
                {
                    "tokens": n_tokens,
                    "hook": hook,
                    "cells": n_cells,
                    "forwards": sweep.n_forwards,
                    "residkit_s": round(mean, 1),
                    "before/after": f"{before:.1f}/{after:.1f}",
                    "whole_runs_s": round(whole_time, 1),
                    "tl_s": round(tl_full, 1),
                    "tl_extrapolated": not full,
                    "speedup": round(ratio, 1),
                    "vs_whole_runs": round(whole_time / mean, 2),
                    "max_abs_diff": diff,
                    "diff/max|value|": diff / scale if scale else 0.0,
                }
            )
            print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
    print()
    table = pd.DataFrame(rows)
    print("| " + " | ".join(table.columns) + " |")
    print("|" + "---|" * len(table.columns))
    for row in table.itertuples(index=False):
        print("| " + " | ".join(f"{v:.2g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
