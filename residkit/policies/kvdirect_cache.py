"""The KV-Direct cache: bounded active K/V, residual checkpoints, K/V recomputed on demand.

:meth:`residkit.KVDirect.make_cache` builds a :class:`KVDirectCache`, a ``transformers`` cache
whose *global* layers are :class:`KVDirectLayer` objects. In every forward it is given:

1. a hook on ``blocks.{l}.hook_resid_pre`` keeps the residual of the chunk entering anchor layer
   ``l`` and, before the block runs, recomputes the K/V of the evicted tokens from their
   checkpoints (so only one layer's recomputed K/V is alive at a time); in token mode the evicted
   span is replayed from its token ids one stretch of blocks at a time, in step with the
   forward: before global layer ``l`` runs, the span's residual is carried from the previous
   global layer up to ``l`` and ``l``'s K/V are taken on the way;
2. the layer's ``update(k, v)`` returns ``[recomputed ; active window ; new]``, the full key
   sequence at the original absolute positions (the layer reports absolute lengths to the mask
   and position code, since ``update()`` itself receives no positions);
3. when the forward's last block has run, the active window is trimmed to the last ``budget``
   tokens and the memory is recorded.

How evicted K/V come back, per plan (:mod:`residkit.policies.plans`): projected from a layer's
checkpoint (norm + K/V projections, :class:`residkit.projector.KVProjector`); replayed from an
anchor's checkpoint through the blocks above it, one block at a time in step with the forward
(stride plans); or replayed from the token ids the same way, block by block from block 0 (token
checkpoints: the replay's peak is the span's residual in and out plus the K/V of the blocks
just replayed, never a whole cache).
In exact mode every original chunk is recomputed with its original shape, which is what makes
the K/V bitwise the model's own.
"""

from __future__ import annotations

import re
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import (
    CacheLayer,
    Piece,
    hf_config,
    hook_points,
    install,
    installed,
    kv_bytes,
    nbytes,
    replay_kv,
)
from residkit.architectures import spec_for
from residkit.policies._eviction import check_window
from residkit.policies.base import PolicyCache
from residkit.policies.checkpoints import ResidualCheckpoints
from residkit.policies.plans import Plan, resolve
from residkit.projector import KVProjector

if TYPE_CHECKING:
    from residkit.policies.kvdirect import KVDirect

__all__ = ["KVDirectCache", "KVDirectLayer"]

# Everything up to the last block's attention: the unembedding side cannot change any K/V.
_BELOW_HEAD = re.compile(r"^(?!ln_final\.|unembed\.)")


class KVDirectLayer(CacheLayer):
    """A global layer's cache: the active window, plus K/V recomputed for this forward."""

    def __init__(self, cache: KVDirectCache, layer: int) -> None:
        super().__init__()
        self.cache, self.layer = cache, layer
        self.cumulative_length = 0  # absolute tokens seen; the active window is a suffix
        self.keep_all = False  # a plan's "kv" layer: never trimmed, nothing recomputed

    def append(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        assert self.keys is not None and self.values is not None
        self.cumulative_length += key_states.shape[-2]
        keys = self.keys = torch.cat([self.keys, key_states], dim=-2)
        values = self.values = torch.cat([self.values, value_states], dim=-2)
        old = self.cache.recomputed.pop(self.layer, None)
        if old is None:
            return keys, values
        return torch.cat([old[0], keys], dim=-2), torch.cat([old[1], values], dim=-2)

    def tokens_seen(self) -> int:
        return self.cumulative_length

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Attention sees every token (recomputed + active + new), from absolute position 0.
        return self.cumulative_length + query_length, 0

    def trim(self, keep: int) -> None:
        """Drop all but the last ``keep`` tokens of the active window."""
        if self.keep_all or not self.ready or self.keys is None or self.values is None:
            return
        if self.keys.shape[-2] > keep:
            start = self.keys.shape[-2] - keep
            self.keys = self.keys[:, :, start:].clone()
            self.values = self.values[:, :, start:].clone()


class KVDirectCache(PolicyCache):
    """One sequence under :class:`~residkit.policies.KVDirect` (see the module docstring).

    Attributes:
        evicted: Tokens ``[0, evicted)`` live only as checkpoints.
        chunks: ``(start, token ids, position ids or None)`` of every forward, in order
            (None: the default ``arange`` from ``start``).
        resid: Residual checkpoints per anchor layer (none in token mode).
        recomputed: K/V recomputed for the forward under way, per layer, until it reads them.
    """

    def __init__(self, model: TransformerBridge, policy: KVDirect) -> None:
        super().__init__(model, policy)
        self.policy: KVDirect = policy
        self.spec = spec_for(model)
        config = hf_config(model)
        self.global_layers = self.spec.managed_layers(config, policy.scope)
        self.limit = self.spec.window_limit(config, policy.scope)
        self.plan: Plan = resolve(
            self.global_layers, policy.checkpoint, policy.stride or 1, policy.keep_top
        )
        for layer in self.global_layers:
            cache_layer = KVDirectLayer(self, layer)
            cache_layer.keep_all = self.plan.action(layer) == "kv"
            install(self, layer, cache_layer)
        self.total = 0
        self.evicted = 0
        self.chunks: list[tuple[int, Tensor, Tensor | None]] = []
        anchors = self.plan.anchors if policy.checkpoint != "token" else []
        self.resid = {layer: ResidualCheckpoints() for layer in anchors}
        self.groups = self.plan.groups()
        self.recomputed: dict[int, tuple[Tensor, Tensor]] = {}
        self.projector = KVProjector(model)
        self._rotary: dict[str, tuple[Tensor, Any]] = {}  # per layer type, for one forward
        self._transient = 0
        self._span: tuple[int, list[Piece]] = (0, [])
        self._watched = self._recompute_path()

    def stateful(self) -> list[Any]:
        return [*super().stateful(), *self.resid.values()]

    # --- hooks --------------------------------------------------------------------------------
    def forward_hooks(self) -> list[tuple[str, Any]]:
        name = self.spec.resid_pre_hook.format
        if self.policy.checkpoint == "token":
            return [
                (name(layer=layer), partial(self._at_token, layer)) for layer in self.global_layers
            ]
        rebuilt = [m for a, members in self.groups.items() for m in members if m != a]
        return [(name(layer=layer), partial(self._at_anchor, layer)) for layer in self.resid] + [
            (name(layer=layer), partial(self._at_rebuilt, layer)) for layer in rebuilt
        ]

    def _recompute_path(self) -> list[HookPoint]:
        """Hook points whose edits a recompute (run with hooks muted) would not repeat."""
        if self.policy.checkpoint == "token":  # the replay runs the whole stack up to the K/V
            return [p for p in hook_points(self.model) if _BELOW_HEAD.match(str(p.name))]
        points = []
        for anchor, members in self.groups.items():
            top = max(members)
            # The anchor's checkpoint is the residual after any edit there, so edits at the
            # anchor stay exact (compared by identity: the bridge names it ``hook_in``).
            kept = self.model.blocks[anchor].hook_resid_pre
            for block in range(anchor, top):  # replayed whole, from the anchor's residual
                points += [p for p in hook_points(self.model.blocks[block]) if p is not kept]
            if top != anchor:  # the replay hands the top layer a residual without the edit
                points.append(self.model.blocks[top].hook_resid_pre)
            points += self.projector.kv_path_points(top)
        return points

    def watched_points(self) -> list[HookPoint]:
        return self._watched

    def edited_message(self, names: str) -> str:
        return (
            f"hooks at {names} changed activations on KV-Direct's recompute path; recomputation "
            "runs with hooks muted, so the recomputed K/V would not be the ones this forward "
            "used. Remove those hooks or decode with FullCache"
            + (
                " (with checkpoint='layer' only the attention inputs of each layer count)"
                if self.policy.checkpoint == "token"
                else ""
            )
        )

    def _at_anchor(self, layer: int, act: Tensor, hook: object) -> None:
        """Before anchor ``layer`` runs: recompute its evicted K/V, keep its residuals."""
        if len(self.groups[layer]) > 1:
            self._start_span(layer)
        else:
            self._recompute_layer(layer)
        # The old buffer is alive while it is copied into the grown one.
        grown = self.resid[layer].append(act.detach())
        self._transient = max(self._transient, grown)

    def _at_rebuilt(self, layer: int, act: Tensor, hook: object) -> None:
        self._advance_span(layer)

    def _at_token(self, layer: int, act: Tensor, hook: object) -> None:
        """Before global ``layer`` runs (token mode): carry the span's replay up to it."""
        if self.evicted and layer == self.global_layers[0]:
            self._span = (0, self._span_pieces(None))  # from the ids, at block 0
        self._advance_span(layer)

    # --- one forward --------------------------------------------------------------------------
    def begin_forward(self, ids: Tensor) -> None:
        check_window(self.limit, self.total + ids.shape[1])
        planned = self.policy.context
        if planned is not None and self.total + ids.shape[1] > planned:
            raise ValueError(
                f"this KVDirect was planned for context={planned} tokens; the sequence would "
                f"reach {self.total + ids.shape[1]}"
            )

    def end_forward(self) -> None:
        ids = self.forward_ids
        assert ids is not None
        self.recomputed.clear()
        self._rotary.clear()
        self._span = (0, [])  # the replay's residual lives for one forward only
        self.chunks.append((self.total, ids, self.forward_positions))
        self.total += ids.shape[1]
        self.evicted = max(self.evicted, self.total - self.policy.budget)
        during = kv_bytes(self)  # the new chunk's K/V, before the window is trimmed
        for layer in self.global_layers:
            installed(self, layer).trim(self.total - self.evicted)
        self.memory.tokens_evicted = self.evicted
        self.memory.record(
            kv_bytes(self),
            self.checkpoint_bytes(),
            self._transient,
            reserved=self.reserved_bytes(),
            during=during,
        )
        self._transient = 0

    def checkpoint_bytes(self) -> int:
        """Bytes of the checkpoints (residual rows, or token ids in token mode)."""
        positions = sum(nbytes(pos) for _, _, pos in self.chunks)  # only where not arange
        if self.policy.checkpoint == "token":
            return sum(nbytes(ids) for _, ids, _ in self.chunks) + positions
        return sum(store.nbytes for store in self.resid.values()) + positions

    def reserved_bytes(self) -> int:
        """Checkpoint bytes allocated, spare rows included (layer mode); token ids as held."""
        if self.policy.checkpoint == "token":
            return self.checkpoint_bytes()
        positions = sum(nbytes(pos) for _, _, pos in self.chunks)
        return sum(store.reserved_bytes for store in self.resid.values()) + positions

    # --- recompute ----------------------------------------------------------------------------
    def _evicted_chunks(self) -> list[tuple[int, Tensor, Tensor | None]]:
        return [chunk for chunk in self.chunks if chunk[0] < self.evicted]

    def _positions(self, start: int, ids: Tensor, given: Tensor | None) -> Tensor:
        """The position ids a chunk was fed at (the default ``arange`` made explicit)."""
        if given is not None:
            return given
        return torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)

    def _piece(self, start: int, ids: Tensor, given: Tensor | None, rows: Tensor | None) -> Piece:
        end = start + ids.shape[1]
        mask = None if self.mask is None else self.mask[:, :end]
        return Piece(ids, self._positions(start, ids, given), mask, rows)

    def _recompute_layer(self, layer: int) -> None:
        """K/V of tokens [0, evicted) at ``layer`` from residual checkpoints (layer mode)."""
        if self.evicted == 0:
            return
        t0 = time.perf_counter()
        rows = self.resid[layer].rows()
        if self.policy.mode == "exact":
            # Whole original chunks: their GEMM shapes are what makes the K/V bitwise.
            chunks = self._evicted_chunks()
            sizes: list[int] | None = [ids.shape[1] for _, ids, _ in chunks]
        else:
            chunks, sizes = self.chunks, None
        n = sum(sizes) if sizes is not None else self.evicted
        kind = self.spec.layer_type(self.projector.config, layer)
        if kind not in self._rotary:
            parts = [self._positions(*chunk) for chunk in chunks]
            batch = max(p.shape[0] for p in parts)
            pos = torch.cat([p.expand(batch, -1) for p in parts], dim=1)[:, :n]
            self._rotary[kind] = (pos, self.projector.position_embeddings(layer, rows, pos, sizes))
        pos, rotary = self._rotary[kind]
        k, v, _ = self.projector(layer, rows[:, :n], pos, chunks=sizes, position_embeddings=rotary)
        self.recomputed[layer] = (k[:, :, : self.evicted], v[:, :, : self.evicted])
        self.memory.recomputed_tokens += n
        # Alive while this layer recomputes: K/V, the norm output (one residual per row) and
        # the rotary tables.
        tables = nbytes(*rotary) if rotary is not None else 0
        self._transient = max(self._transient, nbytes(k, v) + nbytes(rows[:, :n]) + tables)
        self.memory.recompute_seconds += time.perf_counter() - t0

    def _span_pieces(self, rows: Tensor | None) -> list[Piece]:
        """The evicted span as (ids, residual rows) pieces: original chunks in exact mode."""
        if self.policy.mode == "exact":
            return [
                self._piece(
                    start,
                    ids,
                    given,
                    None if rows is None else rows[:, start : start + ids.shape[1]],
                )
                for start, ids, given in self._evicted_chunks()
            ]
        ids = torch.cat([c for _, c, _ in self.chunks], dim=1)[:, : self.evicted]
        batch = ids.shape[0]
        pos = torch.cat(
            [self._positions(*chunk).expand(batch, -1) for chunk in self.chunks], dim=1
        )[:, : self.evicted]
        mask = None if self.mask is None else self.mask[:, : self.evicted]
        return [Piece(ids, pos, mask, None if rows is None else rows[:, : self.evicted])]

    def _start_span(self, anchor: int) -> None:
        """At an anchor with layers to rebuild above it: its own K/V, and the span to carry up."""
        self._recompute_layer(anchor)
        if self.evicted:
            self._span = (anchor, self._span_pieces(self.resid[anchor].rows()))

    def _advance_span(self, layer: int) -> None:
        """Before rebuilt layer ``layer`` runs: replay the span from where it was up to here.

        One block at a time, in step with the forward, so only the span's residual (in, and out
        as each piece passes) and the K/V of the blocks just replayed are alive, never the whole
        group's K/V at once.
        """
        if self.evicted == 0:
            return
        t0 = time.perf_counter()
        start, pieces = self._span
        rows = sum(nbytes(piece.resid) for piece in pieces)
        entering: list[Tensor] = []
        kv, held = replay_kv(
            self.model,
            self.spec.resid_pre_hook,
            start,
            [layer],
            pieces,
            capture=entering,
            release=True,
        )
        k, v = kv[layer]
        self.recomputed[layer] = (k[:, :, : self.evicted], v[:, :, : self.evicted])
        self._span = (
            layer,
            [Piece(p.ids, p.positions, p.mask, r) for p, r in zip(pieces, entering, strict=True)],
        )
        span = sum(piece.ids.shape[1] for piece in pieces)
        self.memory.recomputed_tokens += span
        # Alive at once: the replay's cache, and the span's residual: the pieces still to go in
        # and those already out, so the span plus the piece going through.
        largest = max(nbytes(e) for e in entering)
        self._transient = max(self._transient, held + max(rows, nbytes(*entering)) + largest)
        self.memory.recompute_seconds += time.perf_counter() - t0
