"""Where KV-Direct's recompute time goes, per global layer and step, measured in place.

Runs KV-Direct on SmolLM2-135M's shape (random init, float32, a 512-token prompt) and times,
inside every recompute call: the K and V projection GEMMs, the model's own attention-input
norm, and the whole call. Then the same GEMMs alone in a hot loop on the same shapes, which is
what the FLOP floor of ``benchmarks/kvdirect.py`` assumes.

Run: ``python benchmarks/kvdirect_breakdown.py [--budget 32] [--mode fast] [--new 17]
[--prompt 512] [--tiny]`` (``--tiny``: the zoo's tiny llama, a smoke run that
``tests/test_benchmarks.py`` makes).
Timers wrap the modules with instance-level forwards for the duration of the run only.
"""

import argparse
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import residkit
from residkit import KVDirect, zoo
from residkit._bridge import replaced_forward
from residkit.projector import KVProjector


def timed(fn: Callable[..., Any], bucket: dict[str, float], key: str) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        bucket[key] += time.perf_counter() - t0
        return out

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--mode", default="fast", choices=["exact", "fast"])
    parser.add_argument("--new", type=int, default=17)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument(
        "--tiny", action="store_true", help="the zoo's tiny llama: a smoke run, numbers meaningless"
    )
    args = parser.parse_args()

    model = residkit.load(
        zoo.build("llama", size="tiny") if args.tiny else zoo.build("llama", config="smollm2-135m")
    )
    torch.manual_seed(0)
    prompt = torch.randint(0, model.original_model.config.vocab_size, (1, args.prompt))
    # Timers on the K/V projections and the norm also see the ordinary forwards; only what
    # they accumulate inside a recompute call is kept.
    t: dict[str, float] = {"gemm": 0.0, "norm": 0.0}
    inside: dict[str, float] = {"gemm": 0.0, "norm": 0.0, "call": 0.0}
    calls = 0
    projector_call = KVProjector.__call__

    def counted(self: KVProjector, *a: Any, **k: Any) -> Any:
        nonlocal calls
        calls += 1
        before = dict(t)
        out = timed(projector_call, inside, "call")(self, *a, **k)
        for key in ("gemm", "norm"):
            inside[key] += t[key] - before[key]
        return out

    with ExitStack() as stack:
        for block in model.blocks:
            for lin in (block.attn.k.original_component, block.attn.v.original_component):
                stack.enter_context(replaced_forward([lin], timed(lin.forward, t, "gemm")))
            norm = block.ln1.original_component
            stack.enter_context(replaced_forward([norm], timed(norm.forward, t, "norm")))
        KVProjector.__call__ = counted  # type: ignore[method-assign]
        try:
            gen = residkit.generate(
                model,
                prompt,
                max_new_tokens=args.new,
                policy=KVDirect(args.budget, "layer", args.mode),
                stop_at_eos=False,
            )
        finally:
            KVProjector.__call__ = projector_call  # type: ignore[method-assign]
    rows = gen.stats.recomputed_tokens / max(calls, 1)
    per = {k: v / max(calls, 1) * 1e3 for k, v in inside.items()}

    # Hot loops on the same shape: the GEMMs alone; the least any recompute must run for this
    # family (the model's own norm module, K and V projections and llama's rotary, written out
    # by hand); and residkit's recompute through the bridge.
    layer = 3
    attn = model.blocks[layer].attn
    k_proj, v_proj = attn.k.original_component, attn.v.original_component
    norm = model.blocks[layer].ln1.original_component
    x = torch.randn(1, round(rows), model.cfg.d_model)
    pos = torch.arange(x.shape[1]).unsqueeze(0)
    projector = KVProjector(model)
    cos, sin = projector.position_embeddings(layer, x, pos)
    d_head = model.cfg.d_head

    def by_hand() -> tuple[torch.Tensor, torch.Tensor]:
        h = norm(x)
        keys = k_proj(h).view(1, x.shape[1], -1, d_head).transpose(1, 2)
        values = v_proj(h).view(1, x.shape[1], -1, d_head).transpose(1, 2)
        keys, _ = apply_rotary_pos_emb(keys, keys[:, :0], cos, sin)
        return keys, values

    means: dict[Callable[[], Any], float] = {}

    def best_ms(fn: Callable[[], Any]) -> float:
        times = []
        with torch.no_grad():
            for _ in range(30):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        means[fn] = sum(times) / len(times) * 1e3
        return min(times) * 1e3

    gemm_fn = lambda: (k_proj(x), v_proj(x))  # noqa: E731
    gemms = best_ms(gemm_fn)
    # The FLOP floor benchmarks/kvdirect.py uses: this arithmetic at the hot loop's throughput.
    floor = gemms * x.shape[1] / rows
    # One row: the shape exact mode must use for every evicted decoded token.
    row = x[:, :1].clone()
    gemv = min(best_ms(lambda: (k_proj(row), v_proj(row))) for _ in range(4))
    hand = best_ms(by_hand)
    bridge = best_ms(lambda: projector(layer, x, pos, position_embeddings=(cos, sin)))
    # The engine's other lane (used under split-QKV settings): the whole decoder block.
    needs_block = KVProjector._needs_block
    KVProjector._needs_block = lambda self: True  # type: ignore[method-assign]
    try:
        block = best_ms(lambda: projector(layer, x, pos, position_embeddings=(cos, sin)))
    finally:
        KVProjector._needs_block = needs_block  # type: ignore[method-assign]
    with torch.no_grad():
        hand_k, hand_v = by_hand()
        ours_k, ours_v, _ = projector(layer, x, pos, position_embeddings=(cos, sin))
        same = torch.equal(hand_k, ours_k) and torch.equal(hand_v, ours_v)
    print(
        f"KV-Direct {args.mode} B={args.budget}, {args.new} tokens: {calls} recompute calls, "
        f"{rows:.0f} rows each on average"
    )
    print(
        f"in place, per call (FLOP floor of {rows:.0f} rows at the hot loop's rate: {floor:.2f} ms):"
    )
    print(f"  whole recompute call: {per['call']:.2f} ms ({per['call'] / floor:.2f}x the floor)")
    print(f"  K+V GEMMs:            {per['gemm']:.2f} ms ({per['gemm'] / floor:.2f}x the floor)")
    print(f"  attention-input norm: {per['norm']:.2f} ms ({per['norm'] / floor:.2f}x the floor)")
    print(f"hot loop on {x.shape[1]} rows (best of 30):")
    print(
        f"  K+V GEMMs alone:                                 {gemms:.2f} ms "
        f"(mean of the 30: {means[gemm_fn]:.2f} ms, {means[gemm_fn] / gemms:.2f}x the best)"
    )
    print(f"  norm + K/V + rotary written out by hand:         {hand:.2f} ms")
    print(f"  residkit's recompute (norm + attention bridge):  {bridge:.2f} ms")
    print(f"  the same through the whole block bridge:         {block:.2f} ms")
    print(f"  hand-written K/V == residkit's, bitwise: {same}")
    per_row = gemms / x.shape[1]
    print(
        f"K+V GEMMs on one row (M = 1, best of 4x30): {gemv * 1e3:.1f} us, "
        f"{gemv / per_row:.0f}x the per-row time of the {x.shape[1]}-row GEMM ({per_row * 1e3:.2f} us)"
    )


if __name__ == "__main__":
    main()
