"""The paper's GPU claims, measured in one command (under 8 minutes on one H100).

Sections, each printed as a table and written to one JSON file:

1. **exactness**: on every real model present (SmolLM2, Gemma 3, and the Qwen model when
   cached), in bfloat16 and float32: the Markov test (max KL, which must be exactly 0), K/V
   recomputed from residuals (bitwise), and KV-Direct's layer, stride and token plans against
   the full cache (every step's logits bitwise) on a single prompt and on a padded batch of 4.
2. **per-operation**: the paper's latency claim, "recompute up to 5x faster than reading cached
   tensors at moderate batch sizes": one layer's K/V read (a copy of the cached tensors) against
   recomputed from residual checkpoints (:func:`residkit.reproduction.latency.measure`), 100 to
   4,000 evicted tokens, batch 1 to 64, bfloat16.
3. **decode step**: end-to-end decode step time of FullCache against KV-Direct's plans at batch
   1, 8 and 32 (:func:`throughput.measure`), bfloat16.
4. **device map**: with several GPUs, the model split across them by accelerate
   (``device_map="auto"``), KV-Direct bitwise against the same model on one GPU; with one, the
   JSON says it was not run.

Run: ``python benchmarks/gpu.py [--out gpu-results.json]`` on a CUDA machine;
``python benchmarks/gpu.py --device cpu --tiny`` runs every section on the zoo in seconds (the
smoke test in the suite; its timings say nothing about a GPU). Exits 1 if an exactness check
fails. Without CUDA and without ``--device cpu`` it says so and exits 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from throughput import measure as throughput
from throughput import plans

import residkit
from residkit import registry
from residkit.policies import FullCache, KVDirect
from residkit.reproduction.base import Sizes
from residkit.reproduction.latency import measure as latency

PROMPT = "The lighthouse keeper climbed the stairs every evening, and"
BATCH = ["The capital of France is", "def add(a, b):", "Once upon a time, there lived", "2 + 2 ="]
REAL = ("smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-1.5b-instruct")


def _equal_logits(a, b) -> bool:
    rows_a = list(a) if isinstance(a, residkit.Generations) else [a]
    rows_b = list(b) if isinstance(b, residkit.Generations) else [b]
    return all(torch.equal(x.logits, y.logits) for x, y in zip(rows_a, rows_b, strict=True))


def exactness(model, name: str, dtype: torch.dtype, new: int) -> list[dict[str, Any]]:
    """The exactness checks on one model in one dtype, one record per check."""
    out: list[dict[str, Any]] = []

    def record(check: str, passed: bool, value: str, start: float) -> None:
        out.append({"model": name, "dtype": str(dtype).removeprefix("torch."), "check": check,
                    "passed": passed, "value": value, "seconds": time.perf_counter() - start})  # fmt: skip

    start = time.perf_counter()
    report = residkit.markov_test(model, "The capital of France is Paris.", "def f(x): return x",
                                  align="right")  # fmt: skip
    kl = float(report.table["kl"].max())
    record("markov: max KL over layers", report.passed and kl == 0.0, f"{kl:g}", start)
    start = time.perf_counter()
    kv = residkit.kv_reconstruction_report(model, PROMPT, decode_steps=4)
    record("K/V from residuals, bitwise", kv.passed, str(kv.passed), start)
    kw = {"max_new_tokens": new, "return_logits": True, "stop_at_eos": False}
    for prompt, label in ((PROMPT, "one prompt"), (BATCH, f"batch of {len(BATCH)}, padded")):
        full = residkit.generate(model, prompt, policy=FullCache(), **kw)
        for plan, policy in plans(8, model.cfg.n_layers).items():
            if plan == "full":
                continue
            start = time.perf_counter()
            ours = residkit.generate(model, prompt, policy=policy, **kw)
            same = _equal_logits(ours, full)
            record(f"{plan} == full cache, {new} steps ({label})", same, str(same), start)
    return out


def device_map_check(name: str, new: int) -> dict[str, Any]:
    """KV-Direct on the model split across every GPU, against the model on GPU 0."""
    if torch.cuda.device_count() < 2:
        return {"run": False, "why": f"{torch.cuda.device_count()} GPU(s): nothing to split"}
    one = residkit.load(name, device="cuda:0", dtype=torch.bfloat16)
    split = residkit.load(name, device_map="auto", dtype=torch.bfloat16)
    kw = {"max_new_tokens": new, "return_logits": True, "stop_at_eos": False}
    same = all(
        _equal_logits(residkit.generate(split, BATCH, policy=p, **kw),
                      residkit.generate(one, BATCH, policy=p, **kw))
        for p in (FullCache(), KVDirect(8), KVDirect(8, checkpoint="stride", stride=4))
    )  # fmt: skip
    placement = sorted({str(d) for d in split.original_model.hf_device_map.values()})
    return {"run": True, "devices": placement, "bitwise": same}


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the zoo, every section, seconds")
    parser.add_argument("--out", default="gpu-results.json")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("not measured on a GPU: no CUDA device here (use --device cpu --tiny to smoke-test)")
        return 2
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    known = [n for n in REAL if n in registry.REAL_MODELS]
    names = (
        ["zoo:llama", "zoo:gemma3"] if args.tiny else [n for n in known if registry.cached_path(n)]
    )
    new = 4 if args.tiny else 16
    sizes = Sizes(
        latency_tokens=(16, 64) if args.tiny else (100, 250, 500, 1000, 2000, 4000),
        latency_batches=(1, 4) if args.tiny else (1, 4, 16, 64),
        repeats=1 if args.tiny else 10,
    )
    result: dict[str, Any] = {
        "date": str(datetime.date.today()), "device": gpu or f"{platform.machine()} CPU",
        "torch": torch.__version__, "residkit": residkit.__version__, "models": names,
        "measured_on_gpu": gpu is not None,
    }  # fmt: skip
    started = time.perf_counter()
    checks: list[dict[str, Any]] = []
    for name in names:
        for dtype in (torch.bfloat16, torch.float32):
            model = residkit.load(name, device=args.device, dtype=dtype)
            checks += exactness(model, name, dtype, new)
            del model
    result["exactness"] = checks
    print(_table(checks, ["model", "dtype", "check", "passed", "value", "seconds"]), "\n")

    main_model = residkit.load(names[0], device=args.device, dtype=torch.bfloat16)
    ops = latency(main_model, sizes)
    result["per_operation"] = {"model": names[0], "paper": "up to 5x (recompute faster)",
                               "records": ops}  # fmt: skip
    print(_table(ops, ["batch", "evicted_tokens", "read_s", "recompute_s", "read_over_recompute"]))
    best = max(ops, key=lambda r: r["read_over_recompute"])
    print(f"best read / recompute: {best['read_over_recompute']:.3g}x "
          f"(paper: up to 5x, recompute faster)\n")  # fmt: skip

    batches = [1, 2] if args.tiny else [1, 8, 32]
    context = 32 if args.tiny else 1024
    steps = throughput(main_model, plans(8 if args.tiny else 128, main_model.cfg.n_layers),
                       batches, context, new, 1 if args.tiny else 3)  # fmt: skip
    result["decode_step"] = {"model": names[0], "context": context, "records": steps}
    print(_table(steps, ["batch", "policy", "decode_step_ms", "decode_tokens_per_s", "vs_full"]))
    result["device_map"] = (
        {"run": False, "why": "not on CUDA"} if gpu is None else device_map_check(names[0], new)
    )
    result["seconds"] = time.perf_counter() - started
    if gpu is None:
        result["note"] = "not measured on a GPU: these timings are the CPU's"
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"\n{result.get('note', gpu)}; {result['seconds']:.0f} s; wrote {args.out}")
    return 0 if all(c["passed"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
