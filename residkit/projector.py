"""The one place residkit turns residuals back into K and V (reconstruction and KV-Direct).

Block ``l``'s attention-input norm and attention bridge run on the residual with a
``transformers.Cache`` whose ``update()`` raises with ``(k, v)``: whatever the family does
before its cache write (norm, biases, QK-norm, partial or per-layer-type rotary) is done by the
family's own code, and attention scores and the MLP are never computed. Four economies keep
that cheap enough to run at every decoding step, and none changes a bit of K or V
(``tests/test_projector.py`` checks each against the model's own cache, with negative
controls):

- **No Q.** The query projection returns a tensor with zero heads, so neither its GEMM nor its
  rotary runs. K and V never read Q in any supported family.
- **Hook points muted from a list** built once per layer, not a module walk per call. User
  hooks still never fire during recomputation.
- **The attention bridge, not the block.** The family's attention-input norm (``ArchSpec``'s
  ``attn_norm_path``) and then the block's attention bridge are called directly, skipping the
  decoder layer and block wrappers (``benchmarks/kvdirect_breakdown.py`` times both). K and V
  still come
  out of TransformerLens's own attention code. With ``use_split_qkv_input`` or ``use_attn_in``
  on, the block runs whole, since it is the block that hands attention the pre-norm residual.
- **GEMM shapes on request.** With ``chunks``, the K and V projections run once per original
  chunk, which is what bitwise equality on CPU needs (a float32 GEMM row depends on the row
  count M; ``docs/gemm_shapes.md``). A run of single-token chunks (decoded tokens) goes out as
  one batched GEMM of M = 1 problems, bitwise equal to one M = 1 GEMM each here
  (``benchmarks/gemm_rows.py``). The row-wise norm and element-wise rotary run once over all
  rows: they do not depend on M, and the exactness tests would see it if they did.
"""

import operator
import re
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import (
    CaptureCache,
    Captured,
    attn_norm,
    cache_argument_shim,
    clear_pre_norm_capture,
    hf_config,
    hf_model,
    hook_points,
    linear,
    materialized,
    muted,
    native_norm,
    replaced_forward,
)
from residkit.architectures import spec_for

__all__ = ["KVProjector", "project_rows", "run_sizes", "spans"]

# PyTorch's CPU allocator aligns to 64 bytes; a GEMM input that is a view at another alignment
# may take a different kernel path, so such views are copied first.
_ALIGN = 64
# TransformerLens settings under which attention reads the pre-norm residual the block captures.
_BLOCK_FLAGS = ("use_split_qkv_input", "use_attn_in")


def spans(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``[(start, length)]`` of consecutive chunks of the given sizes."""
    out, start = [], 0
    for size in sizes:
        out.append((start, size))
        start += size
    return out


def run_sizes(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Like :func:`spans`, but consecutive single-token chunks merge into one span of
    ``-count`` (a negative length marks a run of ``count`` one-row GEMMs)."""
    out: list[tuple[int, int]] = []
    for start, size in spans(sizes):
        if size == 1 and out and out[-1][1] < 0:
            out[-1] = (out[-1][0], out[-1][1] - 1)
        else:
            out.append((start, -1 if size == 1 else size))
    return out


def project_rows(linear: nn.Module, x: Tensor, start: int, length: int) -> Tensor:
    """``linear`` over rows ``[start, start + |length|)`` of ``x`` with the original GEMM shapes.

    A positive ``length`` is one chunk: one GEMM. A negative one is a run of single-token
    chunks (decoded tokens): one M = 1 GEMM each, issued as one batched GEMM when the batch's
    problems start where a fresh tensor would (``_ALIGN``). A batched M = 1 problem is
    bitwise equal to the same M = 1 GEMM issued alone on the BLAS measured here, at 1 and 2
    threads (M > 1 is not: at 2 threads the BLAS splits rows between threads by M), and the
    exactness tests of every family would see it otherwise. It saves the per-call dispatch
    of each token's two projections, which at budget 32 costs more than their arithmetic.
    """
    rows = abs(length)
    piece = x.narrow(-2, start, rows)
    run = length < 0 and rows > 1
    row_bytes = x.shape[-1] * x.element_size()
    if (
        run
        and type(linear) is nn.Linear
        and x.dim() == 3
        and x.shape[0] == 1
        and x.is_contiguous()
        and row_bytes % _ALIGN == 0
        and piece.data_ptr() % _ALIGN == 0
    ):
        lin: Any = linear
        batch = piece.reshape(rows, 1, x.shape[-1])
        weight = lin.weight.t().expand(rows, *lin.weight.t().shape)
        if lin.bias is None:
            out = torch.bmm(batch, weight)
        else:
            out = torch.baddbmm(lin.bias.expand(rows, 1, lin.bias.shape[0]), batch, weight)
        return out.reshape(1, rows, -1)
    if run:
        return torch.cat([project_rows(linear, x, start + i, 1) for i in range(rows)], dim=-2)
    if not piece.is_contiguous():  # rows of a batch: the forward's input was a fresh tensor
        piece = piece.contiguous()
    elif piece.data_ptr() % _ALIGN:
        piece = piece.clone()
    if type(linear) is nn.Linear:
        # nn.Linear's own forward, minus its call hooks: an offloaded layer's weights stay
        # materialised for the whole recompute instead of going back to disk after each call.
        return F.linear(piece, linear.weight, linear.bias)
    return linear(piece)


# Hook points inside attention that cannot change K or V: the query side, the scores and
# pattern, the output side. An edit there is seen by the real forward and irrelevant to a
# recompute, which stops at the cache write.
_QUERY_SIDE = re.compile(
    r"\.attn\.(q|q_norm|o)\.|\.attn\.hook_(q_input|rot_q|q_normed|attn_scores|pattern|result|z|out)$"
)


class _Projection:
    """A K or V projection's replacement forward: the original GEMM shapes, and optionally a
    copy of the output per head (the pre-rotary keys)."""

    def __init__(
        self,
        linear: nn.Module,
        sizes: list[tuple[int, int]] | None,
        record: list[Tensor] | None = None,
        d_head: int = 0,
    ) -> None:
        self.linear, self.sizes, self.record, self.d_head = linear, sizes, record, d_head

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.sizes is None:
            out = self.linear(x)
        else:
            with materialized(self.linear):  # project_rows reads the weight itself
                pieces = [project_rows(self.linear, x, s, n) for s, n in self.sizes]
            out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-2)
        if self.record is not None:
            self.record.append(out.unflatten(-1, (-1, self.d_head)))
        return out


class _HFNorm:
    """The norm bridge's replacement forward: the HF norm itself. With hooks muted nobody
    observes the bridge's hook_scale / hook_normalized, so their copy of the norm is skipped."""

    def __init__(self, hf_norm: nn.Module) -> None:
        self.hf_norm = hf_norm

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = self.hf_norm(x)
        return out if out.dtype == x.dtype else out.to(x.dtype)


class _NoQuery:
    """Q's replacement forward: K and V never read Q, so it is zero-width (or zero)."""

    def __init__(self, width: int) -> None:
        self.width = width

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x.new_zeros(()).expand(*x.shape[:-1], self.width)


class KVProjector:
    """Recomputes one layer's K and V from the residual entering it.

    Args:
        model: A bridge from :func:`residkit.load`. The projector holds references to its
            modules and adds nothing to it outside a call.

    Examples:
        >>> import residkit, torch
        >>> model = residkit.load("zoo:llama")
        >>> resid = residkit.capture_residuals(model, "abcd", layers=[2])[0]
        >>> pos = torch.arange(resid.shape[1])[None]  # BOS + 4 bytes
        >>> k, v, _ = KVProjector(model)(2, resid, pos)
        >>> k.shape  # batch, n_kv_heads, pos, d_head
        torch.Size([1, 2, 5, 16])
    """

    def __init__(self, model: TransformerBridge) -> None:
        self.model = model
        self.spec = spec_for(model)
        self.config = hf_config(model)
        path = self.spec.rotary_path
        self.rotary: nn.Module | None = operator.attrgetter(path)(hf_model(model)) if path else None
        self._rotary_points = hook_points(self.rotary)
        # Per (layer, whole block?): the hook points a recompute passes through.
        self._points: dict[tuple[int, bool], list[HookPoint]] = {}

    def position_embeddings(
        self, layer: int, like: Tensor, position_ids: Tensor, chunks: Sequence[int] | None = None
    ) -> Any:
        """The rotary ``(cos, sin)`` block ``layer`` uses at ``position_ids`` (None: no rotary).

        With ``chunks``, computed once per chunk, the way the original forwards did.
        """
        if self.rotary is None:
            return None
        with muted(self._rotary_points):
            if chunks is None:
                return self._rotary_call(layer, like, position_ids)
            parts = [
                self._rotary_call(layer, like, position_ids[:, s : s + n]) for s, n in spans(chunks)
            ]
        return tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(len(parts[0])))

    def _rotary_call(self, layer: int, like: Tensor, position_ids: Tensor) -> Any:
        assert self.rotary is not None
        if self.spec.rotary_by_layer_type:
            return self.rotary(like, position_ids, self.spec.layer_type(self.config, layer))
        return self.rotary(like, position_ids)

    def kv_path_points(self, layer: int) -> list[HookPoint]:
        """The hook points between block ``layer``'s input and its cache write: its norm, the
        K/V side of attention (the whole block under split-QKV settings) and the rotary module.

        A recompute runs with these muted, so a hook that edits an activation there makes
        recomputed K/V differ from the model's own.
        """
        block = self.model.blocks[layer]
        points = (
            hook_points(block)
            if self._needs_block()
            else hook_points(self._norm(layer)) + hook_points(block.attn)
        )
        kept = [p for p in points if not _QUERY_SIDE.search(str(p.name))]
        return kept + self._rotary_points

    def _norm(self, layer: int) -> Any:
        """The norm feeding the block's Q/K/V (a bridge component), or None (OLMo 2: none)."""
        return attn_norm(self.model, layer, self.spec.attn_norm_path)

    def _needs_block(self) -> bool:
        """Whether attention reads the pre-norm residual only the block hands it."""
        return any(getattr(self.model.cfg, flag, False) for flag in _BLOCK_FLAGS)

    def _per_chunk(
        self,
        layer: int,
        residual: Tensor,
        position_ids: Tensor,
        chunks: Sequence[int],
        position_embeddings: Any,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One whole-block call per chunk: split-QKV attention projects per head with the
        weights themselves (an einsum, not the projection modules), so only the original
        chunk shapes keep its K/V bitwise."""
        keys, values = [], []
        for s, n in spans(chunks):
            rotary = (
                None
                if position_embeddings is None
                else tuple(t.narrow(-2, s, n) for t in position_embeddings)
            )
            k, v, _ = self(
                layer,
                residual.narrow(-2, s, n),
                position_ids.narrow(-1, s, n),
                position_embeddings=rotary,
            )
            keys.append(k)
            values.append(v)
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2), None

    def __call__(
        self,
        layer: int,
        residual: Tensor,
        position_ids: Tensor,
        *,
        chunks: Sequence[int] | None = None,
        position_embeddings: Any = None,
        pre_rotary_keys: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(keys, values, pre_rotary_keys or None)`` of block ``layer``.

        Args:
            layer: Block index.
            residual: ``[batch, pos, d_model]``, the values of ``blocks.{layer}.hook_resid_pre``.
            position_ids: ``[batch, pos]`` absolute positions.
            chunks: Sizes of the original forward chunks covering ``pos`` (exact GEMM shapes),
                or None for one GEMM over all rows.
            position_embeddings: Precomputed :meth:`position_embeddings`, to share across layers.
            pre_rotary_keys: Also return the K projection before k-norm and rotary,
                ``[batch, pos, n_kv_heads, d_head]``.
        """
        if chunks is not None and sum(chunks) != residual.shape[-2]:
            raise ValueError(
                f"chunks {list(chunks)} sum to {sum(chunks)} but the residual has "
                f"{residual.shape[-2]} positions"
            )
        whole_block = self._needs_block()
        if whole_block and pre_rotary_keys:
            raise ValueError(
                "pre_rotary_keys is unavailable with use_split_qkv_input or use_attn_in: "
                "attention then projects K per head without the K projection module"
            )
        if whole_block and chunks is not None and len(chunks) > 1:
            return self._per_chunk(layer, residual, position_ids, chunks, position_embeddings)
        block = self.model.blocks[layer]
        if (layer, whole_block) not in self._points:
            # The attention lane passes only through the norm and attention: mute just those.
            self._points[layer, whole_block] = (
                hook_points(block)
                if whole_block
                else hook_points(self._norm(layer)) + hook_points(block.attn)
            )
        if position_embeddings is None:
            position_embeddings = self.position_embeddings(layer, residual, position_ids, chunks)
        attn: Any = block.attn
        pre: list[Tensor] = []
        q_width = (
            0
            if self.spec.query_placeholder == "empty"
            else int(getattr(linear(attn.q), "out_features", 0))
        )
        no_query = _NoQuery(q_width)
        sizes = None if chunks is None else run_sizes(chunks)
        d_head = int(self.model.cfg.d_head)

        with ExitStack() as stack:
            stack.enter_context(muted(self._points[layer, whole_block]))
            norm = self._norm(layer)
            hf_norm = native_norm(norm)
            if hf_norm is not None:
                stack.enter_context(replaced_forward([norm], _HFNorm(hf_norm)))
            keys = _Projection(linear(attn.k), sizes, pre if pre_rotary_keys else None, d_head)
            stack.enter_context(replaced_forward([attn.q], no_query))
            stack.enter_context(replaced_forward([attn.k], keys))
            stack.enter_context(replaced_forward([attn.v], _Projection(linear(attn.v), sizes)))
            kwargs = dict(
                attention_mask=None,
                position_ids=position_ids,
                past_key_values=CaptureCache(),
                use_cache=True,
                position_embeddings=position_embeddings,
                cache_position=position_ids[0],
            )
            try:
                if whole_block:
                    # The block hands attention its cache under transformers' own name.
                    stack.enter_context(cache_argument_shim(self.model))
                    block(residual, **kwargs)
                else:
                    attn(hidden_states=norm(residual) if norm is not None else residual, **kwargs)
            except Captured as got:
                return got.keys, got.values, (pre[0] if pre else None)
            finally:
                # The norm's pre-hook (wired by the block) may have handed attention our
                # residual; the block clears it after its forward, and so do we.
                clear_pre_norm_capture(attn)
        raise RuntimeError(f"layer {layer} of {self.spec.family} finished without a cache write")
