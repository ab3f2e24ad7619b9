"""How KV-Direct gets evicted K/V back: projected from a layer's residual checkpoint, replayed
from an anchor's checkpoint through the blocks above it (stride plans), or replayed from the
token ids through the whole stack (token checkpoints). Mixed into the KV-Direct session."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from residkit._bridge import (
    nbytes,
    replay_kv,
)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from residkit.architectures import ArchSpec
    from residkit.policies.base import MemoryStats
    from residkit.policies.checkpoints import ResidualCheckpoints
    from residkit.projector import KVProjector

__all__ = ["Recompute"]


class Recompute:
    """The recompute half of the KV-Direct session (state lives on the session)."""

    model: TransformerBridge
    policy: Any
    spec: ArchSpec
    memory: MemoryStats
    projector: KVProjector
    global_layers: list[int]
    groups: dict[int, list[int]]
    resid: dict[int, ResidualCheckpoints]
    chunks: list[tuple[int, Tensor]]
    evicted: int
    _recomputed: dict[int, tuple[Tensor, Tensor]]
    _rotary: dict[str, tuple[Tensor, Any]]
    _transient: int
    _span: tuple[int, list[tuple[Tensor, Tensor | None]]]

    def take_recomputed(self, layer: int) -> tuple[Tensor, Tensor] | None:
        return self._recomputed.pop(layer, None)

    def _chunks_covering_evicted(self) -> list[int]:
        return [i for i, (start, _) in enumerate(self.chunks) if start < self.evicted]

    def _recompute_layer(self, layer: int) -> None:
        """K/V of tokens [0, evicted) at ``layer`` from residual checkpoints (layer mode)."""
        if self.evicted == 0:
            return
        t0 = time.perf_counter()
        rows = self.resid[layer].rows()
        if self.policy.mode == "exact":
            # Whole original chunks: their GEMM shapes are what makes the K/V bitwise.
            sizes: list[int] | None = [
                self.chunks[i][1].shape[1] for i in self._chunks_covering_evicted()
            ]
            n = sum(sizes or [])
        else:
            sizes, n = None, self.evicted
        kind = self.spec.layer_type(self.projector.config, layer)
        if kind not in self._rotary:
            pos = torch.arange(n, device=rows.device).unsqueeze(0)
            self._rotary[kind] = (pos, self.projector.position_embeddings(layer, rows, pos, sizes))
        pos, rotary = self._rotary[kind]
        k, v, _ = self.projector(layer, rows[:, :n], pos, chunks=sizes, position_embeddings=rotary)
        self._recomputed[layer] = (k[:, :, : self.evicted], v[:, :, : self.evicted])
        self.memory.recomputed_tokens += n
        # Alive while this layer recomputes: K/V, the norm output (one residual per row) and
        # the rotary tables.
        tables = nbytes(*rotary) if rotary is not None else 0
        self._transient = max(self._transient, nbytes(k, v) + nbytes(rows[:, :n]) + tables)
        self.memory.recompute_seconds += time.perf_counter() - t0

    def _replay_evicted(self) -> None:
        """K/V of tokens [0, evicted) at every global layer, replayed from token ids (token mode).

        The replay stops once the top global layer has its K/V: the blocks above it and the
        unembedding cannot change any K/V.
        """
        if self.evicted == 0:
            return
        t0 = time.perf_counter()
        if self.policy.mode == "exact":
            pieces: list[tuple[Tensor, Tensor | None]] = [
                (self.chunks[i][1], None) for i in self._chunks_covering_evicted()
            ]
        else:
            ids = torch.cat([c for _, c in self.chunks], dim=1)[:, : self.evicted]
            pieces = [(ids, None)]
        kv, held = replay_kv(self.model, self.spec.resid_pre_hook, 0, self.global_layers, pieces)
        for layer, (k, v) in kv.items():
            self._recomputed[layer] = (k[:, :, : self.evicted], v[:, :, : self.evicted])
        self.memory.recomputed_tokens += sum(ids.shape[1] for ids, _ in pieces)
        self._transient = max(self._transient, held)
        self.memory.recompute_seconds += time.perf_counter() - t0

    # --- the forward ---------------------------------------------------------------------
    def _span_pieces(self, rows: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        """The evicted span as (ids, residual rows) pieces: original chunks in exact mode."""
        if self.policy.mode == "exact":
            return [
                (ids, rows[:, start : start + ids.shape[1]])
                for start, ids in (self.chunks[i] for i in self._chunks_covering_evicted())
            ]
        ids = torch.cat([c for _, c in self.chunks], dim=1)[:, : self.evicted]
        return [(ids, rows[:, : self.evicted])]

    def _start_span(self, anchor: int) -> None:
        """At an anchor with layers to rebuild above it: its own K/V, and the span to carry up."""
        self._recompute_layer(anchor)
        if self.evicted:
            self._span = (anchor, self._span_pieces(self.resid[anchor].rows()))

    def _advance_span(self, layer: int) -> None:
        """Before rebuilt layer ``layer`` runs: replay the span from where it was up to here.

        One block at a time, in step with the forward, so only the span's residual and the
        K/V of the blocks just replayed are alive, never the whole group's K/V at once.
        """
        if self.evicted == 0:
            return
        t0 = time.perf_counter()
        start, pieces = self._span
        entering: list[Tensor] = []
        kv, held = replay_kv(
            self.model, self.spec.resid_pre_hook, start, [layer], pieces, capture=entering
        )
        k, v = kv[layer]
        self._recomputed[layer] = (k[:, :, : self.evicted], v[:, :, : self.evicted])
        self._span = (layer, [(ids, r) for (ids, _), r in zip(pieces, entering, strict=True)])
        span = sum(ids.shape[1] for ids, _ in pieces)
        self.memory.recomputed_tokens += span
        rows = sum(nbytes(r) for _, r in pieces if r is not None)
        # Alive: the replay's cache, the span's residual in and the one kept out.
        self._transient = max(self._transient, held + rows + nbytes(*entering))
        self.memory.recompute_seconds += time.perf_counter() - t0
