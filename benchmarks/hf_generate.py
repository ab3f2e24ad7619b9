"""What residkit's cache hooks cost inside transformers' ``generate``.

One process, one model, the same prompt and greedy settings. Each run is transformers'
``generate`` on the wrapped model (``model.original_model.generate``):

- **reference**: with transformers' own ``DynamicCache`` (the bridge's attention needs the cache
  argument under its old name on transformers >= 5.24, so the reference runs under the same
  one-line shim residkit uses: it costs both runs alike);
- **FullCache**: with ``residkit.FullCache().make_cache(model)``, attached: its hooks arm and
  claim every forward and record memory after it;
- **KV-Direct** (for scale, not a bound): with ``residkit.KVDirect(budget)``'s cache.

Runs alternate (reference, FullCache, KV-Direct, reference, ...) so drift on a shared machine
hits each alike; the median of each is reported with the ratio to the reference.
Exits 1 if FullCache's ratio exceeds ``--bound`` (1.10) or any run's tokens differ from the
reference's (KV-Direct is exact, so its tokens must be equal too).

Run: ``python benchmarks/hf_generate.py [--model smollm2-135m-instruct] [--new 64] [--runs 5]``;
``--tiny`` runs the zoo llama in seconds (a smoke run, its ratio is not meaningful).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
from transformers import DynamicCache

import residkit
from residkit._bridge import cache_argument_shim
from residkit.reproduction.prompts import prompt_set


def timed_generate(model, ids: torch.Tensor, cache, new: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.original_model.generate(
            ids,
            past_key_values=cache,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id or 0,
        )
    return time.perf_counter() - start, out[0, ids.shape[1] :]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tiny", action="store_true", help="the zoo llama (smoke run)")
    parser.add_argument("--new", type=int, default=64, help="tokens generated per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--budget", type=int, default=32, help="KV-Direct's budget")
    parser.add_argument("--bound", type=float, default=1.10)
    args = parser.parse_args()

    model = residkit.load("zoo:llama" if args.tiny else args.model)
    ids = prompt_set(model, n=1, tokens=128)[0][1].reshape(1, -1)
    print(
        f"# {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"model {'zoo:llama' if args.tiny else args.model}, prompt {ids.shape[1]} tokens, "
        f"{args.new} new tokens, {args.runs} runs each"
    )

    def reference() -> tuple[float, torch.Tensor]:
        with cache_argument_shim(model):
            cache = DynamicCache(config=model.original_model.config)
            return timed_generate(model, ids, cache, args.new)

    def with_policy(policy) -> tuple[float, torch.Tensor]:
        with policy.make_cache(model) as cache:
            return timed_generate(model, ids, cache, args.new)

    runs = {
        "DynamicCache (reference)": reference,
        "FullCache": lambda: with_policy(residkit.FullCache()),
        f"KV-Direct (budget {args.budget})": lambda: with_policy(residkit.KVDirect(args.budget)),
    }
    reference()  # warm-up: first-call costs (allocator, kernels) are not the hooks'
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, torch.Tensor] = {}
    for _ in range(args.runs):
        for name, run in runs.items():
            seconds, toks = run()
            times[name].append(seconds)
            tokens[name] = toks
    ref_name = "DynamicCache (reference)"
    ref = statistics.median(times[ref_name])
    print(
        "| cache in transformers' generate | median s | tokens/s | ratio to reference | tokens equal |"
    )
    print("|---|---|---|---|---|")
    ok = True
    for name, ts in times.items():
        med = statistics.median(ts)
        same = bool(torch.equal(tokens[name], tokens[ref_name]))
        ok &= same
        print(f"| {name} | {med:.3f} | {args.new / med:.1f} | {med / ref:.3f} | {same} |")
    ratio = statistics.median(times["FullCache"]) / ref
    print(f"FullCache hooks overhead: {ratio:.3f}x the reference (bound {args.bound}x)")
    if not ok:
        print("FAIL: tokens differ from the reference", file=sys.stderr)
        return 1
    if ratio > args.bound and not args.tiny:
        print(f"FAIL: FullCache costs {ratio:.3f}x > {args.bound}x", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
