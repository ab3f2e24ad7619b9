"""The factored SVD of ``W_Q^h W_K^h^T``: two thin QRs and a ``d_head x d_head`` SVD per head.

With thin QRs ``W_Q^h = Q_q R_q``, ``W_K^h = Q_k R_k``, ``M_h = Q_q (R_q R_k^T) Q_k^T``; the
orthonormal ``Q`` factors leave singular values unchanged, so they are those of the small core
``R_q R_k^T``. :func:`explicit_qk_svdvals` materialises ``M_h`` instead, as the reference the
tests and ``benchmarks/spectra.py`` compare against.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

__all__ = ["explicit_qk_svdvals", "kv_head_of", "layers_per_chunk", "qk_singular_values"]

_CHUNK_BYTES = 256 * 2**20


@contextmanager
def _single_threaded(enabled: bool) -> Iterator[None]:
    # torch runs a batch of LAPACK calls one matrix after another, so threads only help
    # inside each thin QR, a little, while every call pays OpenMP barriers that stall when
    # another job shares the cores (docs/results_log.md has the measurement). Restored on exit.
    before = torch.get_num_threads()
    if enabled and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def layers_per_chunk(n_matrices: int, d_model: int, d_head: int, dtype: torch.dtype) -> int:
    # Converting a few layers at a time bounds the float64 copy (~1.4 GB for all of W_Q on
    # a 4B model) while each chunk is still one batched QR.
    per_layer = n_matrices * d_model * d_head * torch.finfo(dtype).bits // 8
    return max(1, _CHUNK_BYTES // max(per_layer, 1))


def kv_head_of(head: int, n_heads: int, n_kv_heads: int) -> int:
    """The KV head query head ``head`` reads under GQA: ``head // (n_heads // n_kv_heads)``.

    Examples:
        >>> [kv_head_of(h, 8, 4) for h in range(8)]
        [0, 0, 1, 1, 2, 2, 3, 3]
    """
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    return head // (n_heads // n_kv_heads)


def qk_singular_values(
    w_q: Float[Tensor, "layer head d_model d_head"],
    w_k: Float[Tensor, "layer kv_head d_model d_head"],
    *,
    dtype: torch.dtype = torch.float64,
) -> Float[Tensor, "layer head d_head"]:
    """Singular values of ``W_Q^h W_K^h^T`` for every (layer, query head), factored.

    Weights use TransformerLens's layout (``q = x @ W_Q``). ``w_k`` holds one matrix per KV
    head; query head ``h`` is paired with KV head ``h // (head / kv_head)``.

    Args:
        w_q: Query weights.
        w_k: Key weights, one per KV head (not expanded to the query heads).
        dtype: Precision of the QR and SVD (float64 keeps rounding near 1e-15 relative).

    Returns:
        Descending singular values, ``d_head`` per head (zero-padded if
        ``d_model < d_head``, where the product has rank at most ``d_model``).

    Examples:
        >>> w_q, w_k = torch.randn(2, 4, 32, 8), torch.randn(2, 2, 32, 8)
        >>> s = qk_singular_values(w_q, w_k)
        >>> bool(torch.allclose(s[1, 3], explicit_qk_svdvals(w_q[1, 3], w_k[1, 1])))
        True
    """
    n_heads, n_kv = w_q.shape[1], w_k.shape[1]
    if n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
    d_model, d_head = w_q.shape[-2:]
    step = layers_per_chunk(n_heads + n_kv, d_model, d_head, dtype)
    out = []
    with _single_threaded(w_q.device.type == "cpu"):
        for start in range(0, w_q.shape[0], step):
            r_q = torch.linalg.qr(w_q[start : start + step].to(dtype), mode="r").R
            r_k = torch.linalg.qr(w_k[start : start + step].to(dtype), mode="r").R
            r_k = r_k.repeat_interleave(n_heads // n_kv, dim=1)  # query h <- KV h // group
            out.append(torch.linalg.svdvals(r_q @ r_k.transpose(-1, -2)))
    sv = torch.cat(out)
    return F.pad(sv, (0, d_head - sv.shape[-1])) if sv.shape[-1] < d_head else sv


def explicit_qk_svdvals(
    w_q: Float[Tensor, "d_model d_head"],
    w_k: Float[Tensor, "d_model d_head"],
    *,
    dtype: torch.dtype = torch.float64,
) -> Float[Tensor, " d_head"]:
    """Reference: the top ``d_head`` singular values of the materialised ``W_Q W_K^T``.

    Costs a full ``d_model x d_model`` SVD; used by tests, ``verify`` and the benchmark to
    check :func:`qk_singular_values`, never by it.
    """
    product = w_q.to(dtype) @ w_k.to(dtype).T
    sv = torch.linalg.svdvals(product)[: w_q.shape[-1]]
    return F.pad(sv, (0, w_q.shape[-1] - sv.shape[0]))
