"""Start-up and check times: ``import residkit``, ``residkit --help``, ``markov_test`` and ``verify``.

Measured in one run, each against a reference taken in the same process:

- ``import residkit`` and ``residkit --help`` / ``--version``: wall time of fresh interpreters
  (best of 3), beside a bare ``python -c pass``;
- ``markov_test`` on a real model, one pair of real prompts at every layer, by each route
  (``compare="final_residual"``, the default, and ``"logits"``): each run's time over the
  median of three full forwards of the same prompt just before it and three just after
  (paired, so drift cancels), the median over runs against the block count it runs,
  ``(L + 1) / 2 + 3`` forward-equivalents;
- ``residkit.verify`` (every section, figures off): seconds per section and in all.

Run: ``python benchmarks/startup.py [--model smollm2-135m-instruct] [--tokens 161] [--runs 3]``.
Exits 1 if import takes 2 s or more, ``--help`` 3 s or more, the default markov_test exceeds
its forward-equivalent bound, or a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import residkit
from residkit.reproduction.prompts import prompt_set


def best_wall(argv: list[str], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


def timed(fn, runs: int = 3) -> list[float]:
    """Seconds of each of ``runs`` calls of ``fn``."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=161)
    parser.add_argument("--runs", type=int, default=3, help="markov_test runs per mode")
    args = parser.parse_args()
    print(
        f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    ok = True
    bare = best_wall([sys.executable, "-c", "pass"])
    imp = best_wall([sys.executable, "-c", "import residkit"])
    cli = best_wall([sys.executable, "-m", "residkit.cli", "--help"])
    ver = best_wall([sys.executable, "-m", "residkit.cli", "--version"])
    print(f"python -c pass: {bare:.2f} s; import residkit: {imp:.2f} s; ", end="")
    print(f"residkit --help: {cli:.2f} s; residkit --version: {ver:.2f} s")
    ok &= imp < 2 and cli < 3

    model = residkit.load(args.model)
    n = model.cfg.n_layers
    (_, src), (_, tgt) = prompt_set(model, n=2, tokens=args.tokens)
    forward = min(timed(lambda: model(src)))
    bound = (n + 1) / 2 + 3
    print(
        f"{args.model}: {src.shape[1]} tokens, {n} layers; one forward {forward:.3f} s; "
        f"bound (L + 1) / 2 + 3 = {bound:.1f} forward-equivalents"
    )
    for compare in ("final_residual", "logits"):
        ratios = []
        for _ in range(args.runs):
            # Paired: the forwards just before and just after this run are its reference, so
            # the machine's drift between runs cancels.
            before = statistics.median(timed(lambda: model(src)))
            start = time.perf_counter()
            report = residkit.markov_test(model, src, tgt, compare=compare)
            seconds = time.perf_counter() - start
            after = statistics.median(timed(lambda: model(src)))
            ok &= report.passed
            ratios.append(seconds / ((before + after) / 2))
        mid = statistics.median(ratios)
        print(
            f"  markov_test(compare={compare!r}): {mid:.1f} forward-equivalents, median of "
            f"{len(ratios)} paired runs ({', '.join(f'{r:.1f}' for r in ratios)})"
        )
        if compare == "final_residual":
            ok &= mid <= bound

    times: dict[str, float] = {}
    report = residkit.verify(
        model,
        name=args.model,
        figures=False,
        progress=lambda s: times.__setitem__(s, time.perf_counter()),
    )
    end = time.perf_counter()
    names = list(times)
    for i, name in enumerate(names):
        stop = times[names[i + 1]] if i + 1 < len(names) else end
        print(f"  verify {name}: {stop - times[name]:.1f} s")
    print(f"verify checks: {report.seconds:.1f} s in all (passed: {report.passed})")
    ok &= report.passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
