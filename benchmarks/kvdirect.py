"""KV-Direct speed and memory, as ratios to full-cache decoding in the same process.

SmolLM2-135M's published shape (random init: speed and memory do not depend on the weights),
a 512-token prompt of random token ids, 64 greedy new tokens, budgets {32, 128, 512}.

For each policy: tokens/s, peak active K/V bytes, peak checkpoint bytes and peak transient
bytes, each as a ratio to FullCache. Also:

- HF ``generate`` on the same weights, to check the FullCache loop (the bridge's hooks and
  residkit's loop) costs at most 1.2x HF's own loop;
- the FLOP floor of each KV-Direct run: the FLOPs of the forward passes plus the recompute
  (norm + K/V projections of every evicted token, every step, every global layer), divided by
  this machine's measured GEMM throughput. ``time / floor`` says how close the implementation
  runs to what the arithmetic alone costs.

Run: ``python benchmarks/kvdirect.py [--prompt 512] [--new 64] [--budgets 32 128 512]``.
Not a test: it prints a table (and ``--markdown`` rows for ``benchmarks/RESULTS.md``).
"""

import argparse
import os
import platform
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import residkit
from residkit import KVDirect, zoo
from residkit.policies import FullCache, NoCache


def gemm_flops_per_second(d_model: int, d_out: int, rows: int = 512, repeats: int = 20) -> float:
    """Measured float32 GEMM throughput for the K/V projection shape on this machine."""
    a, w = torch.randn(rows, d_model), torch.randn(d_model, d_out)
    for _ in range(3):
        a @ w
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ w
    return 2 * rows * d_model * d_out * repeats / (time.perf_counter() - t0)


def forward_flops(
    n_params_no_embed: int, vocab: int, d_model: int, n_layers: int, d_attn: int, q: int, k: int
) -> float:
    """Approximate FLOPs of a forward of ``q`` new tokens attending to ``k`` keys."""
    dense = 2 * q * (n_params_no_embed + vocab * d_model)
    attention = 2 * 2 * q * k * d_attn * n_layers  # scores and weighted sum
    return dense + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--budgets", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    path = zoo.build("llama", config="smollm2-135m")
    model = residkit.load(path)
    hf_cfg = model.original_model.config
    cfg = model.cfg
    torch.manual_seed(0)
    prompt = torch.randint(0, hf_cfg.vocab_size, (1, args.prompt))

    n_params = sum(p.numel() for p in model.original_model.parameters())
    embed = hf_cfg.vocab_size * hf_cfg.hidden_size
    d_attn = cfg.n_heads * cfg.d_head
    kv_out = 2 * cfg.n_key_value_heads * cfg.d_head
    peak = gemm_flops_per_second(cfg.d_model, kv_out)

    def run(policy):
        t0 = time.perf_counter()
        gen = residkit.generate(
            model, prompt, max_new_tokens=args.new, policy=policy, stop_at_eos=False
        )
        return gen, time.perf_counter() - t0

    # HF's own loop on the same weights (the bridge's underlying model, eager attention).
    with torch.no_grad():
        t0 = time.perf_counter()
        hf_out = model.original_model.generate(
            prompt, do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new
        )
        hf_s = time.perf_counter() - t0

    full, full_s = run(FullCache())
    base = full.stats
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"model: SmolLM2-135M shape, random init, float32; prompt {args.prompt}, new {args.new}")
    print(f"measured GEMM throughput ({cfg.d_model}x{kv_out}): {peak / 1e9:.1f} GFLOP/s")
    print(
        f"FullCache tokens == HF generate tokens: {torch.equal(hf_out[0, args.prompt :], full.tokens)}"
    )
    print(
        "| run | seconds | tok/s | speed vs FullCache | peak active K/V | vs full "
        "| peak checkpoints | peak transient | time / FLOP floor |"
    )
    print("|" + "---|" * 9, flush=True)

    def row(name: str, secs: float, gen=None, floor: float | None = None) -> None:
        if gen is None:
            print(
                f"| {name} | {secs:.2f} | {args.new / secs:.1f} | {full_s / secs:.2f}x | | | | | |",
                flush=True,
            )
            return
        s = gen.stats
        print(
            f"| {name} | {secs:.2f} | {s.tokens_per_second:.2f} | {full_s / secs:.3f}x "
            f"| {s.peak_active_kv_bytes / 2**20:.2f} MiB | {s.peak_active_kv_bytes / base.peak_active_kv_bytes:.3f} "
            f"| {s.peak_checkpoint_bytes / 2**20:.2f} MiB | {s.peak_transient_bytes / 2**20:.2f} MiB "
            f"| {'' if floor is None else f'{secs / floor:.2f}'} |",
            flush=True,
        )

    row("HF generate", hf_s)
    row("FullCache", full_s, full)
    none, none_s = run(NoCache())
    row("NoCache", none_s, none)
    summary = [f"FullCache loop / HF generate time: {full_s / hf_s:.2f}x (target <= 1.2x)"]
    for budget in args.budgets:
        for mode in ("exact", "fast"):
            gen, secs = run(KVDirect(budget, "layer", mode))
            # FLOP floor: every forward (1 chunk + new-1 steps) plus the recompute of evicted K/V.
            dense = n_params - embed
            flops = forward_flops(
                dense,
                hf_cfg.vocab_size,
                cfg.d_model,
                cfg.n_layers,
                d_attn,
                args.prompt,
                args.prompt,
            )
            for step in range(1, args.new):
                total = args.prompt + step
                flops += forward_flops(
                    dense, hf_cfg.vocab_size, cfg.d_model, cfg.n_layers, d_attn, 1, total
                )
                flops += 2 * max(0, total - 1 - budget) * cfg.d_model * kv_out * cfg.n_layers
            row(f"KV-Direct {mode} B={budget}", secs, gen, flops / peak)
            assert torch.equal(gen.tokens, full.tokens), f"{mode} B={budget} diverged"
            if mode == "fast":
                summary.append(
                    f"KV-Direct fast B={budget}: {none_s / secs:.1f}x faster than NoCache (target >= 5x)"
                )
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
