"""How close attribution patching comes to exact activation patching on real models.

For each model and each prompt pair (an indirect-object sentence, a factual recall, a sum),
and each hook point, the exact sweep (``patching_sweep``, every layer and position, metric the
logit difference of the clean answer over the corrupted one at the last position) beside the
attribution estimate (``attribution_sweep``; for ``resid_pre`` also with AtP*'s
``correction="qk"``), compared with ``compare_sweeps``: rank
correlation of the effects, top-10 overlap, sign flips among cells with at least 5% of the
largest effect, and the largest error over the largest effect.

Run: ``python benchmarks/attribution_accuracy.py [--models smollm2-135m-instruct gemma3-270m]``.
Prints a Markdown table (``docs/patching.md`` holds the last one).
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
from residkit.patching import HOOKS

PAIRS = {
    # task: (clean prompt, its answer, corrupted prompt, its answer)
    "indirect object": (
        "When Mary and John went to the store, John gave a drink to", " Mary",
        "When Mary and John went to the store, Mary gave a drink to", " John",
    ),
    "factual recall": ("The capital of France is", " Paris", "The capital of Italy is", " Rome"),
    "arithmetic": ("3 + 4 =", " 7", "3 + 5 =", " 8"),
}  # fmt: skip


def first_token(model, text: str) -> int:
    """The answer's first token (past a space a byte-level tokenizer keeps apart)."""
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    blank = len(ids) > 1 and not model.tokenizer.decode(ids[:1]).strip()
    return int(ids[1] if blank else ids[0])


def measure(model, name: str, hooks: list[str], tasks: list[str]) -> list[dict]:
    rows = []
    for task in tasks:
        clean, answer, corrupted, wrong = PAIRS[task]
        a, b = first_token(model, answer), first_token(model, wrong)
        if a == b:
            raise ValueError(f"{name}: {answer!r} and {wrong!r} start with the same token")

        def metric(logits: torch.Tensor, a: int = a, b: int = b) -> torch.Tensor:
            return logits[:, -1, a] - logits[:, -1, b]

        with torch.no_grad():
            scores = [metric(model(model.to_tokens(t))).item() for t in (clean, corrupted)]
        for hook in hooks:
            exact = residkit.patching_sweep(
                model, clean, corrupted, metric, hook=hook, metric_positions=[-1], progress=False
            )
            for correction in ("none", "qk") if hook == "resid_pre" else ("none",):
                est = residkit.attribution_sweep(
                    model, clean, corrupted, metric, hook=hook, correction=correction
                )
                rows.append(row(name, task, hook, est.method, exact, est, scores))
                print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1))
    return rows


def row(name, task, hook, method, exact, est, scores) -> dict:
    s = residkit.compare_sweeps(exact, est).summary
    return {
        "model": name,
        "task": task,
        "hook": hook,
        "estimate": method,
        "cells": s["cells"],
        "spearman": round(float(s["spearman"]), 3),
        "top-10 overlap": f"{float(s['top_10_overlap']):.0%}",
        "sign flips": s["sign_flips"],
        "max error / max effect": round(
            float(s["max_abs_error"]) / max(float(s["max_abs_effect"]), 1e-12), 2
        ),
        "metric clean / corrupted": f"{scores[0]:.2f} / {scores[1]:.2f}",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--hooks", nargs="+", default=list(HOOKS), choices=HOOKS)
    parser.add_argument("--tasks", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    args = parser.parse_args()
    print(
        f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, residkit {residkit.__version__}"
    )
    rows = []
    for name in args.models:
        rows += measure(residkit.load(name), name, args.hooks, args.tasks)
    table = pd.DataFrame(rows)
    print("\n| " + " | ".join(table.columns) + " |")
    print("|" + "---|" * len(table.columns))
    for r in table.itertuples(index=False):
        print("| " + " | ".join(str(v) for v in r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
