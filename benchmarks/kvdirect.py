"""KV-Direct speed and memory, as ratios to full-cache decoding in the same process.

SmolLM2-135M's published shape (random init: speed and memory do not depend on the weights),
a 512-token prompt of random token ids, 64 greedy new tokens, budgets {32, 128, 512}.

**Lockstep pairing.** This host's speed drifts by up to 2x within minutes (a shared VM), so two
runs one after the other do not see the same machine. Each KV-Direct configuration therefore
runs in lockstep with a FullCache cache: both are attached together and advanced one forward
each in turn (which goes first alternates every step), and the K+V projection throughput is
probed (best of 5 GEMMs at M = 512) right after every step. Every step has its own FullCache
time and its own floor, measured within milliseconds of it. Both caches are fed FullCache's
greedy tokens, and the script asserts that KV-Direct picks the same token at every step (and,
in exact mode, that its logits are ``torch.equal`` to FullCache's).

Reported per configuration:

- seconds, speed as a ratio to the paired FullCache steps, tokens/s; peak active K/V, peak
  checkpoint bytes (and bytes reserved for them, spare rows of the growing buffers included),
  peak transient bytes;
- the **FLOP floor of the recompute**: its arithmetic (``stats.recomputed_tokens`` x 2 x d_model
  x 2 n_kv_heads d_head; exact mode counts the whole original chunks it must recompute for
  bitwise K/V) at a hot-loop throughput of the model's own K and V projections at M = 512.
  Two throughputs: **paired**, each step's recompute priced at the probe taken right after it;
  **best**, the highest probe of the whole run (the strictest floor: the machine at its fastest,
  which no step ran at);
- two ratios against it, the two readings of the issue's "within 1.5x of its FLOP floor":
  ``whole / (FullCache + floor)``, the run over the fastest it could be here (full-cache
  decoding's forwards, measured, plus the recompute's arithmetic), and ``recompute / floor``,
  the recompute alone over its arithmetic;
- the **shape floor**: the same GEMMs at the shapes the mode issues them, each timed alone in a
  hot loop after the runs (exact mode's evicted decoded tokens are M = 1 problems, which read
  the whole weight for one row each).

Also: HF ``generate`` on the same weights against FullCache (the loop's overhead; 3 alternating
repeats, medians), NoCache against the median FullCache run, and ``checkpoint="token"`` at
``--token-budgets`` (token ids only; each step replays the evicted span through every block;
its FLOP floor is the replayed token-forwards x the blocks' GEMM FLOPs at the blocks' own
linear-layer throughput, probed after every step).

Run: ``python benchmarks/kvdirect.py [--prompt 512] [--new 64] [--budgets 32 128 512]
[--repeats 2] [--token-budgets 128] [--skip-nocache] [--tiny]``. ``--tiny`` is a smoke run on
the zoo's tiny llama (``tests/test_benchmarks.py``); its numbers mean nothing.
Not a test: it prints the markdown of ``benchmarks/RESULTS.md``.
"""

import argparse
import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM

import residkit
from residkit import KVDirect, zoo
from residkit.generation.engine import next_logits
from residkit.policies import FullCache, MemoryStats, NoCache
from residkit.projector import KVProjector, project_rows, run_sizes


class Probe:
    """Best-of-``repeats`` throughput (FLOP/s) of some of block 0's HF linear layers at M rows."""

    def __init__(self, linears: list[torch.nn.Linear], rows: int = 512) -> None:
        self.linears = linears
        self.x = {m.in_features: torch.randn(1, rows, m.in_features) for m in linears}
        self.flops = sum(2 * rows * m.in_features * m.out_features for m in linears)
        self.seen: list[float] = []

    @torch.no_grad()
    def __call__(self, repeats: int = 5) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for m in self.linears:
                m(self.x[m.in_features])
            best = min(best, time.perf_counter() - t0)
        self.seen.append(self.flops / best)
        return self.seen[-1]


def kv_projection_seconds(model, length: int) -> float:
    """Best hot-loop time of block 0's K and V projections, issued as the recompute issues them.

    ``length`` is a span length of ``residkit.projector.run_sizes``: ``M > 0`` rows as one GEMM,
    or ``-r``, a run of ``r`` single-token chunks (one batched GEMM of ``r`` M = 1 problems).
    """
    attn = model.blocks[0].attn
    k, v = attn.k.original_component, attn.v.original_component
    x = torch.randn(1, abs(length), model.cfg.d_model)
    best = float("inf")
    with torch.no_grad():
        for _ in range(100 if abs(length) < 64 else 30):
            t0 = time.perf_counter()
            project_rows(k, x, 0, length), project_rows(v, x, 0, length)
            best = min(best, time.perf_counter() - t0)
    return best


class GemmShapes:
    """Counts the K/V projection GEMM shapes every recompute call issues: row counts M, and
    runs of single-token chunks (negative: ``-r`` is one batched GEMM of r M = 1 problems)."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self._call = KVProjector.__call__

    def __enter__(self) -> "GemmShapes":
        call = self._call

        def counted(projector: KVProjector, layer: int, residual: Any, *a: Any, **k: Any) -> Any:
            chunks = k.get("chunks")
            self.counts.update(
                [n for _, n in run_sizes(chunks)] if chunks is not None else [residual.shape[-2]]
            )
            return call(projector, layer, residual, *a, **k)

        KVProjector.__call__ = counted  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        KVProjector.__call__ = self._call  # type: ignore[method-assign]


@dataclass
class Step:
    """One forward of each cache: seconds, the recompute inside it, the probe after it."""

    ref_s: float
    kvd_s: float
    recompute_s: float
    rows: int  # recomputed token-rows (layer rows, or token-forwards in token mode)
    throughput: float  # FLOP/s of the probe taken right after the step


@dataclass
class Run:
    name: str
    steps: list[Step]
    stats: MemoryStats
    ref_stats: MemoryStats
    shapes: Counter[int] = field(default_factory=Counter)

    def total(self, attr: str) -> float:
        return sum(getattr(s, attr) for s in self.steps)


@torch.no_grad()
def lockstep(
    model, prompt: torch.Tensor, n_new: int, policy: KVDirect, probe: Probe, name: str
) -> Run:
    """Decode ``n_new`` tokens with FullCache and ``policy`` side by side, one forward each."""
    # Both caches attached at once: each acts only in the forwards given it.
    ref, kvd = FullCache().make_cache(model), policy.make_cache(model)
    steps: list[Step] = []
    feed = prompt
    with ref, kvd, GemmShapes() as shapes:
        for s in range(n_new):
            before = (kvd.memory.recompute_seconds, kvd.memory.recomputed_tokens)
            logits, secs = {}, {}
            order = [("ref", ref), ("kvd", kvd)]
            for key, cache in order if s % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                logits[key] = next_logits(model, feed, cache)
                secs[key] = time.perf_counter() - t0
            token = logits["ref"].argmax(-1)
            assert torch.equal(logits["kvd"].argmax(-1), token), f"{name}: step {s} diverged"
            if policy.mode == "exact":
                assert torch.equal(logits["kvd"], logits["ref"]), f"{name}: step {s} logits"
            steps.append(
                Step(
                    secs["ref"],
                    secs["kvd"],
                    kvd.memory.recompute_seconds - before[0],
                    kvd.memory.recomputed_tokens - before[1],
                    probe(),
                )
            )
            feed = token.view(1, 1)
    return Run(name, steps, kvd.memory, ref.memory, shapes.counts)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--budgets", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--token-budgets",
        type=int,
        nargs="*",
        default=[128],
        help="budgets of the checkpoint='token' runs (one run per mode; each step replays the "
        "evicted span through the whole stack, so these are slow)",
    )
    parser.add_argument("--skip-nocache", action="store_true", help="skip the slow NoCache run")
    parser.add_argument(
        "--tiny", action="store_true", help="the zoo's tiny llama: a smoke run, numbers meaningless"
    )
    args = parser.parse_args()

    folder = (
        zoo.build("llama", size="tiny") if args.tiny else zoo.build("llama", config="smollm2-135m")
    )
    model = residkit.load(folder)
    # HF generate as a user runs it: its own model, not the one the bridge wraps.
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    hf_cfg, cfg = model.original_model.config, model.cfg
    torch.manual_seed(0)
    prompt = torch.randint(0, hf_cfg.vocab_size, (1, args.prompt))
    row_flops = 2 * cfg.d_model * 2 * cfg.n_key_value_heads * cfg.d_head  # one row, one layer
    hf_layer = model.original_model.model.layers[0]
    linears = [m for m in hf_layer.modules() if isinstance(m, torch.nn.Linear)]
    attn = hf_layer.self_attn
    kv_probe = Probe([attn.k_proj, attn.v_proj])
    block_probe = Probe(linears)
    block_flops = 2 * sum(  # a replayed token's GEMMs through all blocks (token mode)
        m.in_features * m.out_features
        for m in model.original_model.model.layers.modules()
        if isinstance(m, torch.nn.Linear)
    )
    load_before = os.getloadavg()

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    def generate(policy: Any) -> Any:
        return residkit.generate(
            model, prompt, max_new_tokens=args.new, policy=policy, stop_at_eos=False
        )

    # HF generate vs residkit's FullCache loop: alternating repeats, medians.
    hf_s, full_s, hf_out, full = [], [], None, None
    for _ in range(1 if args.tiny else 3):
        with torch.no_grad():
            hf_out, secs = timed(
                lambda: hf.generate(
                    prompt, do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new
                )
            )
        hf_s.append(secs)
        full, secs = timed(lambda: generate(FullCache()))
        full_s.append(secs)
    assert hf_out is not None and full is not None
    none_s = None if args.skip_nocache else timed(lambda: generate(NoCache()))[1]
    print(f"  HF {hf_s}, FullCache {full_s}, NoCache {none_s}", flush=True)

    runs: dict[str, list[Run]] = {}
    for _ in range(args.repeats):
        for budget in args.budgets:
            for mode in ("exact", "fast"):
                name = f"KV-Direct {mode} B={budget}"
                run = lockstep(
                    model, prompt, args.new, KVDirect(budget, "layer", mode), kv_probe, name
                )
                print(
                    f"  {name}: {run.total('kvd_s'):.2f} s vs {run.total('ref_s'):.2f} s",
                    flush=True,
                )
                runs.setdefault(name, []).append(run)
    token_runs = []
    for budget in args.token_budgets:
        for mode in ("exact", "fast"):
            name = f"KV-Direct token {mode} B={budget}"
            token_runs.append(
                lockstep(
                    model, prompt, args.new, KVDirect(budget, "token", mode), block_probe, name
                )
            )
            print(f"  {name}: {token_runs[-1].total('kvd_s'):.2f} s", flush=True)
    # Shape floor: every distinct M is timed once, after all runs, in a hot loop.
    all_m = sorted({m for reps in runs.values() for r in reps for m in r.shapes})
    gemm_s = {m: kv_projection_seconds(model, m) for m in all_m}
    best = max(kv_probe.seen)

    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average before {load_before}, "
        f"after {os.getloadavg()}"
    )
    shape = "the zoo's tiny llama" if args.tiny else "SmolLM2-135M shape"
    print(f"model: {shape}, random init, float32; prompt {args.prompt}, new {args.new}")
    print(
        f"K+V projection throughput at M=512 (best of 5, probed {len(kv_probe.seen)} times): "
        f"best {best / 1e9:.1f} GFLOP/s, median {statistics.median(kv_probe.seen) / 1e9:.1f}, "
        f"lowest {min(kv_probe.seen) / 1e9:.1f}"
    )
    print(
        f"FullCache tokens == HF generate tokens: {torch.equal(hf_out[0, args.prompt :], full.tokens)}"
    )
    med_full, med_hf = statistics.median(full_s), statistics.median(hf_s)
    # Why a whole run's own FLOP floor is no yardstick: single-token forwards are memory-bound.
    params = sum(p.numel() for p in model.original_model.parameters())
    forwards_floor = 2 * params * (args.prompt + args.new - 1) / best
    print(
        f"FullCache vs the FLOP floor of its own forwards ({forwards_floor:.2f} s at the best "
        f"probe): {med_full / forwards_floor:.1f}x"
    )
    print(f"\n| run | seconds (median of {len(full_s)}) | vs FullCache | tok/s | peak active K/V |")
    print("|---|---|---|---|---|")
    print(f"| HF generate | {med_hf:.2f} | {med_full / med_hf:.3f}x | {args.new / med_hf:.2f} | |")
    print(
        f"| FullCache | {med_full:.2f} | 1.000x | {args.new / med_full:.2f} "
        f"| {full.stats.peak_active_kv_bytes / 2**20:.2f} MiB |"
    )
    if none_s is not None:
        print(
            f"| NoCache | {none_s:.2f} | {med_full / none_s:.3f}x | {args.new / none_s:.2f} | 0 |"
        )
    summary = [
        f"FullCache loop / HF generate time: {med_full / med_hf:.2f}x (medians; target <= 1.2x)"
    ]

    print(
        "\nLockstep runs (each row one run; floors: paired / best; ratios: paired / best):\n\n"
        "| run | seconds | paired FullCache s | speed vs FullCache | peak active K/V | vs full "
        "| peak checkpoints (reserved) | peak transient | recompute s | FLOP floor s "
        "| shape floor s | recompute / FLOP floor | recompute / shape floor "
        "| whole / (FullCache + FLOP floor) | per decode step: whole / (FullCache + floor), median (IQR) |"
    )
    print("|" + "---|" * 15)
    full_kv = full.stats.peak_active_kv_bytes
    ratios: dict[str, dict[str, list[float]]] = {}
    for name, reps in runs.items():
        for run in reps:
            s, kvd_s, ref_s = run.stats, run.total("kvd_s"), run.total("ref_s")
            rec_s = run.total("recompute_s")
            paired = sum(st.rows * row_flops / st.throughput for st in run.steps)
            strict = s.recomputed_tokens * row_flops / best
            shape_floor = sum(n * gemm_s[m] for m, n in run.shapes.items())
            if not s.recomputed_tokens:  # nothing evicted: no recompute to compare
                continue
            per_step = sorted(
                st.kvd_s / (st.ref_s + st.rows * row_flops / st.throughput) for st in run.steps[1:]
            )
            q = statistics.quantiles(per_step, n=4) if len(per_step) > 1 else per_step * 3
            r = ratios.setdefault(name, {})
            for key, value in (
                ("whole_paired", kvd_s / (ref_s + paired)),
                ("whole_best", kvd_s / (ref_s + strict)),
                ("rec_paired", rec_s / paired),
                ("rec_best", rec_s / strict),
                ("rec_shape", rec_s / shape_floor),
                ("speed", ref_s / kvd_s),
                ("step_median", statistics.median(per_step)),
            ):
                r.setdefault(key, []).append(value)
            print(
                f"| {name} | {kvd_s:.2f} | {ref_s:.2f} | {ref_s / kvd_s:.3f}x "
                f"| {s.peak_active_kv_bytes / 2**20:.2f} MiB | {s.peak_active_kv_bytes / full_kv:.3f} "
                f"| {s.peak_checkpoint_bytes / 2**20:.2f} ({s.peak_checkpoint_reserved_bytes / 2**20:.2f}) MiB "
                f"| {s.peak_transient_bytes / 2**20:.2f} MiB | {rec_s:.2f} | {paired:.2f} / {strict:.2f} "
                f"| {shape_floor:.2f} | {rec_s / paired:.2f} / {rec_s / strict:.2f} | {rec_s / shape_floor:.2f} "
                f"| {kvd_s / (ref_s + paired):.2f} / {kvd_s / (ref_s + strict):.2f} "
                f"| {statistics.median(per_step):.2f} ({q[0]:.2f}-{q[2]:.2f}) |"
            )
    for name, r in ratios.items():
        summary.append(
            f"{name} over {len(r['speed'])} runs, median (range): whole / (FullCache + FLOP floor) "
            f"paired {spread(r['whole_paired'])}, best {spread(r['whole_best'])}; recompute / "
            f"FLOP floor paired {spread(r['rec_paired'])}, best {spread(r['rec_best'])}; recompute "
            f"/ shape floor {spread(r['rec_shape'])}; speed vs FullCache {spread(r['speed'])} "
            "(target <= 1.5x)"
        )
        if name.startswith("KV-Direct fast") and none_s is not None:
            kvd_s = statistics.median(run.total("kvd_s") for run in runs[name])
            summary.append(
                f"{name}: {none_s / kvd_s:.1f}x faster than NoCache (median run; target >= 5x)"
            )
    if token_runs:
        print(
            f"\ncheckpoint='token' (block GEMM throughput at M=512, best of 5 probed after every "
            f"step: best {max(block_probe.seen) / 1e9:.1f} GFLOP/s; {block_flops / 2e6:.1f} M "
            "block weights per token):\n"
        )
        print(
            "| run | seconds | paired FullCache s | speed vs FullCache | peak active K/V "
            "| peak checkpoints | replayed token-forwards | recompute s | FLOP floor s (paired) "
            "| recompute / floor | whole / (FullCache + floor) |"
        )
        print("|" + "---|" * 11)
        for run in token_runs:
            s, kvd_s, ref_s = run.stats, run.total("kvd_s"), run.total("ref_s")
            rec_s = run.total("recompute_s")
            floor = sum(st.rows * block_flops / st.throughput for st in run.steps)
            print(
                f"| {run.name} | {kvd_s:.2f} | {ref_s:.2f} | {ref_s / kvd_s:.3f}x "
                f"| {s.peak_active_kv_bytes / 2**20:.2f} MiB "
                f"| {s.peak_checkpoint_bytes / 2**10:.2f} KiB | {s.recomputed_tokens} "
                f"| {rec_s:.2f} | {floor:.2f} | {rec_s / floor:.2f} | {kvd_s / (ref_s + floor):.2f} |"
            )
            summary.append(
                f"{run.name}: {ref_s / kvd_s:.3f}x FullCache's speed; recompute "
                f"{rec_s / floor:.2f}x its FLOP floor; whole run {kvd_s / (ref_s + floor):.2f}x "
                "(paired FullCache + floor)"
            )
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
