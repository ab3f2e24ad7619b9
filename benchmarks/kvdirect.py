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

Run: ``python benchmarks/kvdirect.py [--prompt 512] [--new 64] [--budgets 32 128 512]``.
Not a test: it prints a table in the markdown of ``benchmarks/RESULTS.md``.
"""

import argparse
import os
import platform
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import residkit
from residkit import KVDirect, zoo
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


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--budgets", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--skip-nocache", action="store_true", help="skip the slow NoCache run")
    args = parser.parse_args()

    model = residkit.load(zoo.build("llama", config="smollm2-135m"))
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
    pairs = []
    for budget in args.budgets:
        for mode in ("exact", "fast"):
            peaks.append(kv_projection_flops_per_second(model))
            ref_s = run(FullCache())[1]
            gen, secs = run(KVDirect(budget, "layer", mode))
            assert torch.equal(gen.tokens, full.tokens), f"{mode} B={budget} diverged"
            pairs.append((f"KV-Direct {mode} B={budget}", mode, gen, secs, ref_s))
    peak = max(peaks)

    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average before {load_before}, "
        f"after {os.getloadavg()}"
    )
    print(f"model: SmolLM2-135M shape, random init, float32; prompt {args.prompt}, new {args.new}")
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
        "| vs full | peak checkpoints | peak transient | recompute s | floor s "
        "| recompute / floor | total / (FullCache + floor) |"
    )
    print("|" + "---|" * 13)
    base = full.stats
    print(
        f"| HF generate | {hf_s:.2f} | {full_s:.2f} | {full_s / hf_s:.3f}x | {args.new / hf_s:.2f} |"
        + " |" * 8
    )
    print(
        f"| FullCache | {full_s:.2f} | {full_s:.2f} | 1.000x | {base.tokens_per_second:.2f} "
        f"| {base.peak_active_kv_bytes / 2**20:.2f} MiB | 1.000 | 0 | 0 | | | | |"
    )
    if none_s is not None:
        print(
            f"| NoCache | {none_s:.2f} | {full_s:.2f} | {full_s / none_s:.3f}x | {args.new / none_s:.2f} | 0 | 0 | 0 | 0 | | | | |"
        )
    summary = [f"FullCache loop / HF generate time: {full_s / hf_s:.2f}x (target <= 1.2x)"]
    for name, mode, gen, secs, ref_s in pairs:
        s = gen.stats
        floor = s.recomputed_tokens * row_flops / peak
        if not floor:  # nothing evicted: no recompute to compare
            continue
        print(
            f"| {name} | {secs:.2f} | {ref_s:.2f} | {ref_s / secs:.3f}x | {s.tokens_per_second:.2f} "
            f"| {s.peak_active_kv_bytes / 2**20:.2f} MiB "
            f"| {s.peak_active_kv_bytes / base.peak_active_kv_bytes:.3f} "
            f"| {s.peak_checkpoint_bytes / 2**20:.2f} MiB | {s.peak_transient_bytes / 2**20:.2f} MiB "
            f"| {s.recompute_seconds:.2f} | {floor:.2f} | {s.recompute_seconds / floor:.2f} "
            f"| {secs / (ref_s + floor):.2f} |"
        )
        summary.append(
            f"{name}: whole run {secs / (ref_s + floor):.2f}x (paired FullCache + recompute floor), "
            f"recompute alone {s.recompute_seconds / floor:.2f}x its floor (target <= 1.5x)"
        )
        if mode == "fast" and none_s is not None:
            summary.append(f"{name}: {none_s / secs:.1f}x faster than NoCache (target >= 5x)")
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
