"""Token checkpoints over a long context: peak memory and time against the full cache, same process.

The full cache and ``KVDirect(budget, "token")`` decode the same prompt fed in the same prefill
chunks (so KV-Direct's logits are bitwise the full cache's, which the script checks), and the
table gives each one's peak total bytes (active K/V during a forward + checkpoints +
transients, from the tensors) and wall time.

Run: ``python benchmarks/token_memory.py [--tokens 1998 --chunk 128 --budget 32 --new 2]``;
``--tiny`` runs the zoo model (a smoke run).
"""

from __future__ import annotations

import argparse
import time

import torch

import residkit
from residkit.reproduction.prompts import text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--tokens", type=int, default=1998)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--new", type=int, default=2)
    args = parser.parse_args()
    model = residkit.load("zoo:llama" if args.tiny else args.model)
    ids = model.to_tokens(text("code-difflib"))[:, : args.tokens]
    kw = {"max_new_tokens": args.new, "return_logits": True, "stop_at_eos": False}
    runs = {
        "full cache": residkit.FullCache(prefill_chunk=args.chunk),
        "KV-Direct, token checkpoints": residkit.KVDirect(
            args.budget, "token", prefill_chunk=args.chunk
        ),
    }
    out = {}
    for name, policy in runs.items():
        start = time.perf_counter()
        out[name] = (
            residkit.generate(model, ids, policy=policy, **kw),
            time.perf_counter() - start,
        )
    (full, full_s), (kvd, _) = out.values()
    same = torch.equal(full.logits, kvd.logits)
    print(f"{ids.shape[1]} prompt tokens, chunks of {args.chunk}, budget {args.budget}, "
          f"{args.new} new; logits bitwise equal: {same}")  # fmt: skip
    print("| | peak total (MB) | peak active K/V (MB) | peak transient (MB) | wall time (s) |")
    print("|---|---|---|---|---|")
    for name, (gen, seconds) in out.items():
        s = gen.stats
        ratio = s.peak_total_bytes / full.stats.peak_total_bytes
        print(f"| {name} | {s.peak_total_bytes / 1e6:.2f} ({ratio:.2f}x) | "
              f"{s.peak_active_kv_bytes / 1e6:.2f} | {s.peak_transient_bytes / 1e6:.2f} | "
              f"{seconds:.1f} ({seconds / full_s:.1f}x) |")  # fmt: skip
    if not same:
        raise SystemExit("token checkpoints' logits differ from the full cache's")


if __name__ == "__main__":
    main()
