"""Replaying a span of tokens through a range of blocks, from residuals saved at its bottom.

Stride checkpoints keep the residual entering block ``start`` only; the K/V of the blocks
above it are rebuilt by running the span through those blocks again. The replay is the model's
own forward with the blocks below ``start`` passed through (:func:`skipped_blocks`), the saved
residual put in at ``start``, and the forward stopped once the last wanted layer has handed its
K/V to the cache. Fed in the span's original chunks, every GEMM has its original shape, so the
K/V are bitwise the ones the model computed.

Blocks below ``start`` never run, so their cache layers would stay empty; transformers reads
the tokens seen so far (positions) and the mask sizes from a layer of the right kind, which may
be one of them. Each chunk therefore advances those layers by a one-wide zero entry per token
and head (transformers counts an empty tensor as no tokens): the length is right, and they hold
``n_kv_heads`` floats per token instead of ``2 * n_kv_heads * d_head``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from residkit._bridge.cache import (
    CacheLayer,
    cached_forward,
    install,
    kv_bytes,
    layer_kv,
    new_cache,
)
from residkit._bridge.hooks import muted_hook_points, temporary_hooks
from residkit._bridge.model import n_kv_heads, skipped_blocks

__all__ = ["Piece", "replay_cache", "replay_kv"]


@dataclass
class Piece:
    """One original forward of a span, as a replay feeds it again.

    Attributes:
        ids: Token ids ``[batch, n]``.
        positions: The position ids the original forward used (``[batch or 1, n]``), given
            explicitly so the replay never derives other ones from the mask.
        mask: The 2-D attention mask up to the piece's last token (None: nothing masked).
        resid: Residuals ``[batch, n, d_model]`` entering the replay's first block, or None
            when the replay starts at block 0 from the ids.
    """

    ids: Tensor
    positions: Tensor
    mask: Tensor | None = None
    resid: Tensor | None = None

    def forward_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"position_ids": self.positions}
        if self.mask is not None:
            kwargs["attention_mask"] = self.mask.long()
        return kwargs


class _Done(Exception):
    """The last wanted layer has its K/V: nothing above it is needed."""


class _LastLayer(CacheLayer):
    """The top wanted layer's cache: stores this chunk's K/V, then stops the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        assert self.keys is not None and self.values is not None
        self.keys = torch.cat([self.keys, keys], dim=-2)
        self.values = torch.cat([self.values, values], dim=-2)
        self.seen += keys.shape[-2]
        raise _Done

    def tokens_seen(self) -> int:
        return self.seen

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0


class _Put:
    """A hook that replaces the activation with the saved residual."""

    def __init__(self, resid: Tensor) -> None:
        self.resid = resid

    def __call__(self, act: Tensor, hook: Any) -> Tensor:
        return self.resid


class _Keep:
    """A hook that keeps the activation (the residual entering the top layer)."""

    def __init__(self, into: list[Tensor]) -> None:
        self.into = into

    def __call__(self, act: Tensor, hook: Any) -> None:
        self.into.append(act.detach())


def replay_kv(
    model: Any,
    resid_pre_hook: str,
    start: int,
    layers: Sequence[int],
    chunks: Sequence[Piece],
    capture: list[Tensor] | None = None,
    release: bool = False,
) -> tuple[dict[int, tuple[Tensor, Tensor]], int]:
    """K/V at ``layers`` (each >= ``start``) of a span, rebuilt from residuals at ``start``.

    Args:
        model: The bridge.
        resid_pre_hook: The residual hook name pattern (``"blocks.{layer}.hook_resid_pre"``).
        start: The block whose input the residuals are.
        layers: The layers whose K/V to return.
        chunks: The span's original forwards in order, from position 0. With ``start > 0``
            the ids only give the forward its shape and each piece's residuals replace the
            stream at ``start``; with ``start == 0`` the ids are the input.
        capture: If a list, each chunk's residual entering the top layer is appended to it
            (to continue the replay from there).
        release: Drop each piece's residual (``piece.resid = None``) once it has gone through,
            so the span's residual in and out are never both alive whole: at most the span
            plus one piece.

    Returns:
        ``{layer: (keys, values)}``, each ``[batch, n_kv_heads, span, d_head]``, and the bytes the
        replay's cache held at its end (every replayed layer's K/V, the counters below).

    User hooks are muted for the replay (it is not a forward of the user's).
    """
    top = max(layers)
    cache = new_cache(model)
    stop = _LastLayer()
    install(cache, top, stop)
    below: list[Any] = [cache.layers[i] for i in range(start)]
    kv_heads = n_kv_heads(model)
    with muted_hook_points(model), skipped_blocks(model, start):
        for piece in chunks:
            hooks: list[tuple[str, Any]] = []
            if start > 0:
                if piece.resid is None:
                    raise ValueError(f"a replay from block {start} needs the residuals there")
                hooks = [(resid_pre_hook.format(layer=start), _Put(piece.resid))]
            if capture is not None:
                hooks.append((resid_pre_hook.format(layer=top), _Keep(capture)))
            with temporary_hooks(model, hooks), contextlib.suppress(_Done):
                cached_forward(model, piece.ids, cache, return_type=None, **piece.forward_kwargs())
            like = piece.resid if piece.resid is not None else piece.ids.float()
            if release:
                hooks.clear()
                piece.resid = None
            # After the chunk, as the skipped blocks' own caches would have grown (in the
            # residual's dtype and on its device, never read).
            batch, n = piece.ids.shape
            empty = like.new_zeros(batch, kv_heads, n, 1)
            del like
            for skipped in below:
                skipped.update(empty, empty)
    out = {}
    for layer in layers:
        kv = layer_kv(cache, layer)
        if kv is None:
            raise RuntimeError(f"layer {layer} received no K/V during the replay")
        out[layer] = kv
    return out, kv_bytes(cache)


def replay_cache(model: Any, piece: Piece) -> Any:
    """A fresh cache of the model's own layers holding the K/V of ``piece`` (one forward, user
    hooks muted, the unembedding run at the last position only)."""
    cache = new_cache(model)
    with muted_hook_points(model):
        cached_forward(
            model, piece.ids, cache, return_type=None, logits_to_keep=1, **piece.forward_kwargs()
        )
    return cache
