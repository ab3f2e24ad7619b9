"""Can KV-Direct's recompute hide behind the decoding forward on this machine?

The paper's "no latency penalty" rests on recompute being compute-bound while single-token
decoding is memory-bound, so the two could run at the same time. This measures that on the
machine at hand, with the model's own HF modules (no residkit code in either path):

- *forward*: N greedy decoding steps with a full cache after a 512-token prefill;
- *recompute*: N steps of what KV-Direct recomputes at B=32: every layer's attention-input
  norm and K and V projections on ``--rows`` evicted rows;
- *concurrent*: the recompute in a second Python thread (PyTorch releases the GIL inside its
  kernels) while the forward runs.

``hidden`` is the share of the recompute's time that the concurrent run saves over running the
two one after the other: 1.0 would be the paper's no-penalty case, 0 no overlap at all.

Run: ``python benchmarks/kvdirect_overlap.py [--steps 16] [--rows 480] [--repeats 6] [--tiny]``.
Commit c265e32 also had ``KVDirect(overlap=True)``, a worker thread recomputing one layer
ahead of the forward, and ``--integrated`` to time it (``benchmarks/RESULTS.md``); it was
removed because it did not make decoding faster here.
Not a test; ``--tiny`` is a smoke run (``tests/test_benchmarks.py``).
"""

import argparse
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import DynamicCache

import residkit
from residkit import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rows", type=int, default=480, help="evicted rows recomputed per step")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--tiny", action="store_true", help="the zoo's tiny llama (smoke run)")
    args = parser.parse_args()

    model = residkit.load(
        zoo.build("llama", size="tiny") if args.tiny else zoo.build("llama", config="smollm2-135m")
    )
    hf = model.original_model
    layers = hf.model.layers
    torch.manual_seed(0)
    prompt = torch.randint(0, hf.config.vocab_size, (1, args.prompt))
    rows = torch.randn(1, args.rows, hf.config.hidden_size)

    def recompute() -> None:
        for _ in range(args.steps):
            for layer in layers:
                h = layer.input_layernorm(rows)
                layer.self_attn.k_proj(h), layer.self_attn.v_proj(h)

    def decode(cache: DynamicCache) -> None:
        token = prompt[:, -1:]
        for _ in range(args.steps):
            token = hf(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    def fresh_cache() -> DynamicCache:
        cache = DynamicCache(config=hf.config)
        hf(prompt, past_key_values=cache, use_cache=True)
        return cache

    def both(cache: DynamicCache) -> None:
        worker = threading.Thread(target=torch.no_grad()(recompute))
        worker.start()
        decode(cache)
        worker.join()

    def timed(fn: Callable[..., None], *args: Any) -> float:
        t0 = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t0

    results = []
    with torch.no_grad():
        for i in range(args.repeats):
            # The host's speed drifts: alternate which of the two ways runs first.
            if i % 2:
                both_s = timed(both, fresh_cache())
            forward_s = timed(decode, fresh_cache())
            recompute_s = timed(recompute)
            if not i % 2:
                both_s = timed(both, fresh_cache())
            hidden = (forward_s + recompute_s - both_s) / recompute_s
            results.append((forward_s, recompute_s, both_s, hidden))
            print(
                f"  forward {forward_s:.2f} s, recompute {recompute_s:.2f} s, one after the other "
                f"{forward_s + recompute_s:.2f} s, concurrent {both_s:.2f} s, hidden {hidden:.2f}",
                flush=True,
            )
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; model: "
        f"{'tiny llama' if args.tiny else 'SmolLM2-135M shape'}, float32; prompt {args.prompt}, "
        f"{args.steps} steps, {args.rows} recomputed rows per layer and step"
    )
    print("\n| repeat | forward s | recompute s | one after the other s | concurrent s | hidden |")
    print("|---|---|---|---|---|---|")
    for i, (f, r, b, h) in enumerate(results, 1):
        print(f"| {i} | {f:.2f} | {r:.2f} | {f + r:.2f} | {b:.2f} | {h:.2f} |")
    print(
        f"\nshare of the recompute hidden by running it concurrently: median "
        f"{statistics.median(r[3] for r in results):.2f} "
        f"(range {min(r[3] for r in results):.2f}-{max(r[3] for r in results):.2f})"
    )


if __name__ == "__main__":
    main()
