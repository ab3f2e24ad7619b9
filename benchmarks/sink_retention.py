"""Does each eviction baseline keep the attention sink (position 0) while decoding?

For every policy at one budget, on the real models and the reproduction's first prompt: the
share of (global layer, KV head) pairs that still hold position 0 after the prompt (one new
token) and after ``--decoded`` more tokens. Prints a table; the numbers back the sink column of
``docs/policies.md``.

    python benchmarks/sink_retention.py [--budget 64] [--decoded 8] [--model NAME ...]
"""

from __future__ import annotations

import argparse

import pandas as pd

import residkit
from residkit.comparison import kept_positions
from residkit.policies import H2O, TOVA, SnapKV, StreamingLLM, Window
from residkit.reproduction.prompts import prompt_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--decoded", type=int, default=8)
    parser.add_argument("--model", action="append")
    args = parser.parse_args()
    b = args.budget
    policies = {
        "window": Window(b),
        "streaming": StreamingLLM(b, n_sink=4),
        "h2o": H2O(b),
        "snapkv decode=window": SnapKV(b, window_size=min(32, b // 2)),
        "snapkv decode=append": SnapKV(b, window_size=min(32, b // 2), decode="append"),
        "tova": TOVA(b),
    }
    rows = []
    for name in args.model or ["smollm2-135m-instruct", "gemma3-270m"]:
        model = residkit.load(name)
        _, prompt = prompt_set(model, 1, 400)[0]
        for label, policy in policies.items():
            row = {"model": name, "policy": label}
            for when, steps in (
                ("after prompt", 1),
                (f"after {args.decoded} decoded", args.decoded + 1),
            ):
                kept = kept_positions(model, prompt, policy, max_new_tokens=steps)
                pairs = kept.groupby(["layer", "kv_head"])["position"].min()
                row[f"sink kept, {when} (%)"] = round(100 * float((pairs == 0).mean()), 1)
            rows.append(row)
    with pd.option_context("display.width", 120):
        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
