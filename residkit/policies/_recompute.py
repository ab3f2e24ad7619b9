"""How KV-Direct gets evicted K/V back: projected from a layer's residual checkpoint, replayed
from an anchor's checkpoint through the blocks above it (stride plans), or replayed from the
token ids through the whole stack (token checkpoints). Mixed into the KV-Direct session."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from residkit._bridge import (
    cached_forward,
    kv_bytes,
    layer_kv,
    muted_hook_points,
    nbytes,
    new_cache,
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
        """K/V of tokens [0, evicted) at every global layer, replayed from token ids (token mode)."""
        if self.evicted == 0:
            return
        t0 = time.perf_counter()
        replay = new_cache(self.model)
        with muted_hook_points(self.model):
            if self.policy.mode == "exact":
                for i in self._chunks_covering_evicted():
                    cached_forward(self.model, self.chunks[i][1], replay, return_type=None)
                    self.memory.recomputed_tokens += self.chunks[i][1].shape[1]
            else:
                ids = torch.cat([c for _, c in self.chunks], dim=1)[:, : self.evicted]
                cached_forward(self.model, ids, replay, return_type=None)
                self.memory.recomputed_tokens += self.evicted
        for layer in self.global_layers:
            kv = layer_kv(replay, layer)
            assert kv is not None
            self._recomputed[layer] = (kv[0][:, :, : self.evicted], kv[1][:, :, : self.evicted])
        self._transient = max(self._transient, kv_bytes(replay))
        self.memory.recompute_seconds += time.perf_counter() - t0

    # --- the forward ---------------------------------------------------------------------
    def _replay_group(self, anchor: int) -> None:
        """K/V of tokens [0, evicted) at every layer of ``anchor``'s group (stride plans)."""
        if self.evicted == 0:
            return
        t0 = time.perf_counter()
        rows = self.resid[anchor].rows()
        if self.policy.mode == "exact":
            pieces = [
                (ids, rows[:, start : start + ids.shape[1]])
                for start, ids in (self.chunks[i] for i in self._chunks_covering_evicted())
            ]
        else:
            ids = torch.cat([c for _, c in self.chunks], dim=1)[:, : self.evicted]
            pieces = [(ids, rows[:, : self.evicted])]
        members = self.groups[anchor]
        kv = replay_kv(self.model, self.spec.resid_pre_hook, anchor, members, pieces)
        for layer, (k, v) in kv.items():
            self._recomputed[layer] = (k[:, :, : self.evicted], v[:, :, : self.evicted])
        span = sum(piece[0].shape[1] for piece in pieces)
        self.memory.recomputed_tokens += span
        # Alive while the group is rebuilt: its K/V, and the residual rows fed in.
        self._transient = max(
            self._transient, sum(nbytes(k, v) for k, v in kv.values()) + nbytes(rows[:, :span])
        )
        self.memory.recompute_seconds += time.perf_counter() - t0
