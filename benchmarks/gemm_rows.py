"""Which float32 GEMM shapes give a row the same bits: what exact recompute may and may not merge.

Exact KV-Direct needs every recomputed K/V row bitwise equal to the row the model computed.
``docs/gemm_shapes.md`` shows that a row computed alone (M = 1) differs from the same row
computed inside the prompt's GEMM. This script maps the rest of the question on this machine,
for the K+V projection shape of SmolLM2-135M (576 -> 2 x 192) and of the zoo's tiny models
(64 -> 2 x 32), at 1 and 2 torch threads:

1. **Prefix rows**: for which M are the rows of an M-row GEMM bitwise equal to the first M
   rows of the 512-row GEMM? (If always, exact mode could skip the prompt rows it does not
   need; it cannot rely on that, since the answer is a property of the BLAS and the machine.)
2. **Batched M = 1**: is one ``bmm`` of r problems of one row each bitwise equal to r separate
   M = 1 GEMMs (``F.linear``)? Exact mode issues runs of decoded tokens that way.
3. **Batched M > 1**: the same for r problems of M rows each (exact mode does not batch them).

Run: ``python benchmarks/gemm_rows.py [--tiny]``. Prints markdown; random N(0, 1) inputs and
N(0, 0.02) weights with seed 0. Not a test: the answers describe this machine.
"""

import argparse

import torch
import torch.nn.functional as F

SHAPES = {"SmolLM2-135M K+V": (576, 384), "zoo tiny K+V": (64, 64)}
PREFIX_M = [1, 2, 3, 4, 5, 7, 8, 9, 11, 12, 16, 31, 32, 63, 64, 100, 128, 255, 256, 384, 511]


def prefix_mismatches(x: torch.Tensor, w: torch.Tensor, ms: list[int]) -> list[int]:
    """The M whose M-row GEMM rows differ from the first M rows of the full GEMM."""
    full = F.linear(x, w)
    return [m for m in ms if not torch.equal(F.linear(x[:m].clone(), w), full[:m])]


def batched_equal(x: torch.Tensor, w: torch.Tensor, rows: int, problems: int) -> bool:
    """One bmm of ``problems`` problems of ``rows`` rows vs one F.linear per problem."""
    batch = x[: rows * problems].reshape(problems, rows, -1)
    alone = torch.stack([F.linear(batch[i].clone(), w) for i in range(problems)])
    return torch.equal(torch.bmm(batch, w.t().expand(problems, *w.t().shape)), alone)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="fewer shapes: a smoke run")
    args = parser.parse_args()
    threads_before = torch.get_num_threads()
    ms = PREFIX_M[:6] if args.tiny else PREFIX_M
    print(f"torch {torch.__version__}, {threads_before} threads by default\n")
    print(
        "| shape | threads | prefix M that differ from the 512-row GEMM's rows "
        "| bmm of M = 1 problems == M = 1 each (r = 2, 7, 31, 100) "
        "| bmm of M = 2 / 5 problems == alone (r = 7) |"
    )
    print("|---|---|---|---|---|")
    try:
        for name, (d_in, d_out) in SHAPES.items():
            torch.manual_seed(0)
            x, w = torch.randn(512, d_in), torch.randn(d_out, d_in) * 0.02
            for threads in (1, 2):
                torch.set_num_threads(threads)
                bad = prefix_mismatches(x, w, ms)
                one = [batched_equal(x, w, 1, r) for r in (2, 7, 31, 100)]
                more = [batched_equal(x, w, m, 7) for m in (2, 5)]
                print(
                    f"| {name} ({d_in} -> {d_out}) | {threads} | {bad or 'none'} of {len(ms)} "
                    f"| {' / '.join(map(str, one))} | {' / '.join(map(str, more))} |"
                )
    finally:
        torch.set_num_threads(threads_before)


if __name__ == "__main__":
    main()
