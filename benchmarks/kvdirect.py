"""KV-Direct speed and memory, as ratios to full-cache decoding in the same process.

SmolLM2-135M's published shape (random init: speed and memory do not depend on the weights),
a 512-token prompt of random token ids, 64 greedy new tokens, budgets {32, 128, 512}.

For each policy: seconds, tokens/s and speed as a ratio to FullCache; peak active K/V bytes,
peak checkpoint bytes and peak transient bytes. Also:

- HF ``generate`` on the same weights, to check that the FullCache loop (the bridge's hooks and
  residkit's loop) costs at most 1.2x HF's own loop;
- the **FLOP floor of each recompute mode**: the recompute's arithmetic (2 x rows x d_model x
  2 n_kv_heads d_head per layer, where ``rows`` is what the mode must push through the K/V
  projections: the evicted tokens in fast mode, the whole original chunks that hold them in
  exact mode; ``Generation.stats.recomputed_tokens`` counts them) divided by the best
  throughput this machine reaches on the model's own K and V projections at M = 512. Two
  ratios use it:
  - ``recompute / floor``: seconds spent recomputing (``stats.recompute_seconds``) over that
    floor, i.e. how close the recompute runs to its arithmetic;
  - ``total / (FullCache + floor)``: the whole run over the FullCache run plus the floor, i.e.
    over the fastest KV-Direct could possibly be here (it must do full-cache decoding's
    forwards and the recompute's arithmetic).
  The pure FLOP floor of a whole run (forwards included) is printed for FullCache too, to show
  why it is not used: single-token forwards are memory-bound, and FullCache itself runs far
  above it.
- the **shape floor**: the same GEMMs timed alone, at the shapes the mode must run them (best
  of a hot loop per row count M, summed over every K/V projection call the recompute made).
  A FLOP floor prices an M = 1 GEMM, which exact mode must run for every evicted decoded token
  (its original shape), at the throughput of M = 512, far faster than any M = 1 GEMM runs
  here, since it reads the whole weight for one row. Exact mode issues a run of such tokens as
  one batched GEMM of M = 1 problems, and the shape floor times that batch as issued. Both
  floors are reported.

- ``checkpoint="token"`` (token ids only, the paper's one-vector-per-token accounting taken
  literally) at ``--token-budgets``: each step replays the evicted span through every block.
  Its FLOP floor is the replayed token-forwards times the blocks' GEMM FLOPs per token (norms,
  attention scores and the unembedding not counted) at the best throughput of a block's linear
  layers at M = 512.

Each KV-Direct run (layer checkpoints) is repeated ``--repeats`` times, each time paired with a FullCache run just
before it; the table shows the run with the median whole-run ratio and the summary the range.

Run: ``python benchmarks/kvdirect.py [--prompt 512] [--new 64] [--budgets 32 128 512]
[--repeats 3] [--token-budgets 128] [--skip-nocache] [--tiny]``. ``--tiny`` is a smoke run on
the zoo's tiny llama (``tests/test_benchmarks.py``); its numbers mean nothing.
Not a test: it prints a table in the markdown of ``benchmarks/RESULTS.md``.
"""

import argparse
import os
import platform
import statistics
import time
from collections import Counter
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import residkit
from residkit import KVDirect, zoo
from residkit._recompute import KVProjector, _project, _runs
from residkit.generation import Generation
from residkit.policies import CachePolicy, FullCache, NoCache


def kv_projection_flops_per_second(model, rows: int = 512, repeats: int = 30) -> float:
    """Best measured float32 throughput of block 0's own K and V projections at ``rows`` rows."""
    attn = model.blocks[0].attn
    k, v = attn.k.original_component, attn.v.original_component
    x = torch.randn(1, rows, model.cfg.d_model)
    flops = 2 * rows * model.cfg.d_model * (k.weight.shape[0] + v.weight.shape[0])
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            k(x), v(x)
            best = min(best, time.perf_counter() - t0)
    return flops / best


def layer_gemm_flops_per_second(model, rows: int = 512, repeats: int = 10) -> float:
    """Best measured throughput of all of block 0's HF linear layers at ``rows`` rows."""
    linears = [
        m for m in model.original_model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)
    ]
    x = {m.in_features: torch.randn(1, rows, m.in_features) for m in linears}
    flops = sum(2 * rows * m.in_features * m.out_features for m in linears)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for m in linears:
                m(x[m.in_features])
            best = min(best, time.perf_counter() - t0)
    return flops / best


def kv_projection_seconds(model, length: int) -> float:
    """Best hot-loop time of block 0's K and V projections, issued as the recompute issues them.

    ``length`` is a span length of ``residkit._recompute._runs``: ``M > 0`` rows as one GEMM,
    or ``-r``, a run of ``r`` single-token chunks (one batched GEMM of ``r`` M = 1 problems).
    """
    attn = model.blocks[0].attn
    k, v = attn.k.original_component, attn.v.original_component
    x = torch.randn(1, abs(length), model.cfg.d_model)
    best = float("inf")
    with torch.no_grad():
        for _ in range(100 if abs(length) < 64 else 30):
            t0 = time.perf_counter()
            _project(k, x, 0, length), _project(v, x, 0, length)
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
                [n for _, n in _runs(chunks)] if chunks is not None else [residual.shape[-2]]
            )
            return call(projector, layer, residual, *a, **k)

        KVProjector.__call__ = counted  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        KVProjector.__call__ = self._call  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--budgets", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--repeats", type=int, default=3)
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

    model = residkit.load(
        zoo.build("llama", size="tiny") if args.tiny else zoo.build("llama", config="smollm2-135m")
    )
    hf_cfg, cfg = model.original_model.config, model.cfg
    torch.manual_seed(0)
    prompt = torch.randint(0, hf_cfg.vocab_size, (1, args.prompt))
    kv_out = 2 * cfg.n_key_value_heads * cfg.d_head
    row_flops = 2 * cfg.d_model * kv_out  # one token-row through one layer's K and V
    forward_flops = 2 * sum(p.numel() for p in model.original_model.parameters())
    load_before = os.getloadavg()

    def run(policy: CachePolicy) -> tuple[Generation, float]:
        t0 = time.perf_counter()
        gen = residkit.generate(
            model, prompt, max_new_tokens=args.new, policy=policy, stop_at_eos=False
        )
        secs = time.perf_counter() - t0
        print(f"  ran {policy!r}: {secs:.2f} s", flush=True)
        return gen, secs

    # Every ratio is against a reference run in the same process. The machine's speed drifts
    # (shared host), so each KV-Direct run is paired with a FullCache run just before it, and
    # the GEMM throughput is re-measured before each pair; the floor uses the best throughput
    # seen in the whole run, which makes it the strictest (lowest) floor.
    peaks = [kv_projection_flops_per_second(model)]
    with torch.no_grad():
        t0 = time.perf_counter()
        hf_out = model.original_model.generate(
            prompt, do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new
        )
        hf_s = time.perf_counter() - t0
    full, full_s = run(FullCache())
    none_s = run(NoCache())[1] if not args.skip_nocache else None
    runs: dict[str, list[tuple[Generation, float, float, Counter[int]]]] = {}
    for _ in range(args.repeats):
        for budget in args.budgets:
            for mode in ("exact", "fast"):
                peaks.append(kv_projection_flops_per_second(model))
                ref_s = run(FullCache())[1]
                with GemmShapes() as shapes:
                    gen, secs = run(KVDirect(budget, "layer", mode))
                assert torch.equal(gen.tokens, full.tokens), f"{mode} B={budget} diverged"
                runs.setdefault(f"KV-Direct {mode} B={budget}", []).append(
                    (gen, secs, ref_s, shapes.counts)
                )
    # checkpoint="token": token ids only; each step replays the evicted span through every block.
    token_runs = []
    for budget in args.token_budgets:
        for mode in ("exact", "fast"):
            ref_s = run(FullCache())[1]
            gen, secs = run(KVDirect(budget, "token", mode))
            assert torch.equal(gen.tokens, full.tokens), f"token {mode} B={budget} diverged"
            token_runs.append((f"KV-Direct token {mode} B={budget}", gen, secs, ref_s))
    layer_peak = max(layer_gemm_flops_per_second(model) for _ in range(3))
    peak = max(peaks)
    # Shape floor: every distinct M is timed once, after all runs, on a quiet loop.
    all_m = sorted({m for reps in runs.values() for *_, counts in reps for m in counts})
    gemm_s = {m: kv_projection_seconds(model, m) for m in all_m}

    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average before {load_before}, "
        f"after {os.getloadavg()}"
    )
    shape = "the zoo's tiny llama" if args.tiny else "SmolLM2-135M shape"
    print(f"model: {shape}, random init, float32; prompt {args.prompt}, new {args.new}")
    print(
        f"K+V projection throughput at M=512 (best of 30, measured {len(peaks)} times): "
        f"best {peak / 1e9:.1f} GFLOP/s, lowest {min(peaks) / 1e9:.1f}"
    )
    print(
        f"FullCache tokens == HF generate tokens: {torch.equal(hf_out[0, args.prompt :], full.tokens)}"
    )
    whole_floor = forward_flops * (args.prompt + args.new - 1) / peak
    print(
        f"FullCache vs the pure FLOP floor of its forwards ({whole_floor:.2f} s): "
        f"{full_s / whole_floor:.1f}x (single-token forwards are memory-bound)"
    )
    print(
        "\n| run | seconds | paired FullCache s | speed vs FullCache | tok/s | peak active K/V "
        "| vs full | peak checkpoints | peak transient | recompute s | FLOP floor s "
        "| shape floor s | recompute / FLOP floor | recompute / shape floor "
        "| total / (FullCache + FLOP floor) | total / (FullCache + shape floor) |"
    )
    print("|" + "---|" * 16)
    base = full.stats
    print(
        f"| HF generate | {hf_s:.2f} | {full_s:.2f} | {full_s / hf_s:.3f}x | {args.new / hf_s:.2f} |"
        + " |" * 11
    )
    print(
        f"| FullCache | {full_s:.2f} | {full_s:.2f} | 1.000x | {base.tokens_per_second:.2f} "
        f"| {base.peak_active_kv_bytes / 2**20:.2f} MiB | 1.000 | 0 | 0 | | | | | | | |"
    )
    if none_s is not None:
        print(
            f"| NoCache | {none_s:.2f} | {full_s:.2f} | {full_s / none_s:.3f}x | {args.new / none_s:.2f} | 0 | 0 | 0 | 0 | | | | | | | |"
        )
    summary = [f"FullCache loop / HF generate time: {full_s / hf_s:.2f}x (target <= 1.2x)"]
    for name, reps in runs.items():
        rows = []
        for gen, secs, ref_s, counts in reps:
            s = gen.stats
            flop_floor = s.recomputed_tokens * row_flops / peak
            shape_floor = sum(n * gemm_s[m] for m, n in counts.items())
            rows.append((secs / (ref_s + shape_floor), gen, secs, ref_s, flop_floor, shape_floor))
        if not rows[0][4]:  # nothing evicted: no recompute to compare
            continue
        rows.sort(key=lambda r: r[0])
        _, gen, secs, ref_s, flop_floor, shape_floor = rows[len(rows) // 2]
        s = gen.stats
        print(
            f"| {name} | {secs:.2f} | {ref_s:.2f} | {ref_s / secs:.3f}x | {s.tokens_per_second:.2f} "
            f"| {s.peak_active_kv_bytes / 2**20:.2f} MiB "
            f"| {s.peak_active_kv_bytes / base.peak_active_kv_bytes:.3f} "
            f"| {s.peak_checkpoint_bytes / 2**20:.2f} MiB | {s.peak_transient_bytes / 2**20:.2f} MiB "
            f"| {s.recompute_seconds:.2f} | {flop_floor:.2f} | {shape_floor:.2f} "
            f"| {s.recompute_seconds / flop_floor:.2f} | {s.recompute_seconds / shape_floor:.2f} "
            f"| {secs / (ref_s + flop_floor):.2f} | {secs / (ref_s + shape_floor):.2f} |"
        )

        def spread(values: list[float]) -> str:
            return f"median {statistics.median(values):.2f} (range {min(values):.2f}-{max(values):.2f})"

        summary.append(
            f"{name} over {len(rows)} runs: whole run / (paired FullCache + floor): FLOP floor "
            + spread([r[2] / (r[3] + r[4]) for r in rows])
            + ", shape floor "
            + spread([r[0] for r in rows])
            + "; recompute / floor: FLOP "
            + spread([r[1].stats.recompute_seconds / r[4] for r in rows])
            + ", shape "
            + spread([r[1].stats.recompute_seconds / r[5] for r in rows])
            + " (target <= 1.5x)"
        )
        if name.startswith("KV-Direct fast") and none_s is not None:
            summary.append(
                f"{name}: {none_s / statistics.median(r[2] for r in rows):.1f}x faster than "
                "NoCache (median run; target >= 5x)"
            )
    if token_runs:
        # A replayed token costs at least its blocks' GEMMs (attention scores, norms and the
        # unembedding not counted: the strictest floor), at the best throughput of block 0's
        # linear layers at M = 512.
        block_flops = 2 * sum(
            m.in_features * m.out_features
            for m in model.original_model.model.layers.modules()
            if isinstance(m, torch.nn.Linear)
        )
        print(
            f"\ncheckpoint='token' (block GEMM throughput at M=512, best of 3x10: "
            f"{layer_peak / 1e9:.1f} GFLOP/s; {block_flops / 2e6:.1f} M block weights per token):\n"
        )
        print(
            "| run | seconds | paired FullCache s | speed vs FullCache | tok/s | peak active K/V "
            "| peak checkpoints | replayed token-forwards | recompute s | FLOP floor s "
            "| recompute / floor | total / (FullCache + floor) |"
        )
        print("|" + "---|" * 12)
        for name, gen, secs, ref_s in token_runs:
            s = gen.stats
            floor = s.recomputed_tokens * block_flops / layer_peak
            print(
                f"| {name} | {secs:.2f} | {ref_s:.2f} | {ref_s / secs:.3f}x "
                f"| {s.tokens_per_second:.2f} | {s.peak_active_kv_bytes / 2**20:.2f} MiB "
                f"| {s.peak_checkpoint_bytes / 2**10:.2f} KiB | {s.recomputed_tokens} "
                f"| {s.recompute_seconds:.2f} | {floor:.2f} | {s.recompute_seconds / floor:.2f} "
                f"| {secs / (ref_s + floor):.2f} |"
            )
            summary.append(
                f"{name}: {ref_s / secs:.3f}x FullCache's speed; recompute "
                f"{s.recompute_seconds / floor:.2f}x its FLOP floor; whole run "
                f"{secs / (ref_s + floor):.2f}x (paired FullCache + floor)"
            )
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
