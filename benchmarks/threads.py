"""torch's threads on a busy machine: a short forward with torch's default (one per core)
against residkit's ``auto_threads`` (the free cores) and one thread, in the same process.

``--busy K`` starts K processes that keep one core each busy (a pure-Python loop) for the
measurement, to stand for other users of a shared machine; the one-minute load average is
printed beside each number (it takes a minute to follow a change, so ``auto_threads`` is given
the busy count directly when ``--busy`` is set).

Run: ``python benchmarks/threads.py [--busy 2] [--model smollm2-135m-instruct]``; ``--tiny``
runs the zoo model (a smoke run).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import torch

import residkit
from residkit.threads import auto_threads, cores


def _spin(stop: mp.Event) -> None:  # type: ignore[valid-type]
    while not stop.is_set():  # type: ignore[attr-defined]
        sum(i * i for i in range(10_000))


def best_forward(model, tokens: torch.Tensor, threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    best = float("inf")
    with torch.no_grad():
        model(tokens)  # warm
        for _ in range(repeats):
            start = time.perf_counter()
            model(tokens)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--busy", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = residkit.load("zoo:llama" if args.tiny else args.model)
    tokens = torch.randint(0, 200, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    stop = mp.Event()
    spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    try:
        time.sleep(1.0 if args.busy else 0.0)
        auto = auto_threads(load=float(args.busy)) if args.busy else auto_threads()
        runs = {"torch default": cores(), "residkit auto": auto, "one thread": 1}
        times = {k: best_forward(model, tokens, n, args.repeats) for k, n in runs.items()}
    finally:
        stop.set()
        for p in spinners:
            p.join(timeout=5)
    load = os.getloadavg()[0]
    print(f"{cores()} cores, {args.busy} busy processes started, load average {load:.1f}")
    print("| threads | n | best forward (s) | vs torch default |")
    print("|---|---|---|---|")
    for k, n in runs.items():
        print(f"| {k} | {n} | {times[k]:.4f} | {times[k] / times['torch default']:.2f}x |")


if __name__ == "__main__":
    main()
