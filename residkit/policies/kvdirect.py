"""KV-Direct: bounded active K/V, residual checkpoints, K/V recomputed on demand.

Arxiv 2603.19664 (Fig. 1, right): the most recent ``budget`` tokens keep their K/V; older
tokens keep a checkpoint, and their K/V are recomputed when attention needs them.

Mechanism. A ``transformers.DynamicCache`` is passed as ``past_key_values`` through the bridge
forward, with each *global* layer replaced by a :class:`KVDirectLayer`. At every forward:

1. a hook on ``blocks.{l}.hook_resid_pre`` keeps the residual of the chunk entering global
   layer ``l`` and, before the block runs, recomputes the K/V of the evicted tokens from their
   checkpoints (so only one layer's recomputed K/V is alive at a time);
2. the layer's ``update(k, v)`` returns ``[recomputed ; active window ; new]``, which is the
   full key sequence at the original absolute positions (the layer reports absolute lengths to
   the mask and position code, since ``update()`` itself receives no positions);
3. after the forward, the active window is trimmed to the last ``budget`` tokens.

Sliding-window layers (Gemma 2/3 local layers, windowed Mistral) are already bounded by the
model; they keep the model's own sliding cache and no checkpoints.

Checkpoint modes:

- ``"layer"`` (the paper's): the residual of every token at every global layer; K/V by norm +
  projection only. A token's residual must be kept from the moment it is computed (it cannot be
  recovered from its K/V at eviction), so checkpoints grow by ``d_model`` per global layer per
  token, next to at most ``budget`` tokens of active K/V. On GQA models that is more than the
  K/V it replaces (SmolLM2-135M: 576 vs 2 x 3 x 64 = 384 values per layer per token).
- ``"token"`` (the paper's "one vector per token" accounting, taken literally): only token ids;
  the evicted span is recomputed through the whole stack (a prefill of the evicted span).

``mode="exact"`` recomputes every original chunk with its original shape (the prompt as one
chunk, each decoded token alone; inside one call per layer, see :mod:`residkit.projector`),
so every step's logits are bitwise equal to full-cache decoding. ``mode="fast"`` recomputes
the evicted span as one chunk; with
``measure_deviation=True`` a shadow full cache runs alongside and the max |logit difference|
is reported.
"""

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import (
    CacheLayer,
    cached_forward,
    hf_config,
    install,
    installed,
    kv_bytes,
    layer_kv,
    muted_hook_points,
    nbytes,
    new_cache,
    temporary_hooks,
)
from residkit._validate import choice, non_negative_int
from residkit.architectures import spec_for
from residkit.policies.base import CachePolicy, CacheSession
from residkit.projector import KVProjector

__all__ = [
    "CHECKPOINTS",
    "KVDIRECT_MODES",
    "Checkpoint",
    "KVDirect",
    "KVDirectLayer",
    "Mode",
    "ResidualCheckpoints",
]

Checkpoint = Literal["layer", "token"]
Mode = Literal["exact", "fast"]
CHECKPOINTS: tuple[Checkpoint, ...] = ("layer", "token")
KVDIRECT_MODES: tuple[Mode, ...] = ("exact", "fast")


class ResidualCheckpoints:
    """One global layer's residual checkpoints, ``[batch, pos, d_model]``, appended in place.

    Rows live in one buffer with room to grow, so a step copies only its own new rows. Merging
    a list of chunks instead copies every stored row at every step (O(T) a step: 1.2 MiB a layer
    at 512 tokens of SmolLM2-135M). When the buffer is full it is reallocated with
    ``1 / GROWTH`` spare rows: the copy then costs ``GROWTH`` rows a step, amortised, and the
    spare rows are reported (:attr:`reserved_bytes`), never hidden in :attr:`nbytes`.

    Rows are views of the buffer; a chunk starting at row ``s`` is aligned like a fresh tensor
    whenever ``s * d_model * 4`` bytes is a multiple of 64 (``residkit.projector.project_rows``
    copies a view that is not, before its GEMM).

    Example:
        >>> store = ResidualCheckpoints()
        >>> store.append(torch.ones(1, 8, 4)), store.append(torch.zeros(1, 1, 4))  # room for 9
        (0, 0)
        >>> store.append(torch.zeros(1, 1, 4))  # full: 9 rows (144 B) copied into room for 11
        144
        >>> store.rows().shape, store.nbytes, store.reserved_bytes
        (torch.Size([1, 10, 4]), 160, 176)
    """

    GROWTH = 8

    def __init__(self) -> None:
        self.buffer: Tensor | None = None
        self.length = 0

    def append(self, rows: Float[Tensor, "batch pos d_model"]) -> int:
        """Add rows after the stored ones; return the bytes of the old buffer if it was regrown.

        Those bytes are alive while the stored rows are copied into the new buffer (or 0).

        Raises:
            ValueError: ``rows`` is not ``[batch, pos, d_model]`` like the rows already stored.
        """
        if rows.dim() != 3 or (
            self.buffer is not None
            and (rows.shape[:-2], rows.shape[-1]) != (self.buffer.shape[:-2], self.buffer.shape[-1])
        ):
            stored = None if self.buffer is None else tuple(self.rows().shape)
            raise ValueError(
                f"rows of shape {tuple(rows.shape)} cannot follow checkpoints of shape {stored}: "
                "expected [batch, pos, d_model] with the same batch and d_model"
            )
        need = self.length + rows.shape[-2]
        grown = 0
        if self.buffer is None or need > self.buffer.shape[-2]:
            capacity = need + need // self.GROWTH
            new = rows.new_empty(*rows.shape[:-2], capacity, rows.shape[-1])
            if self.buffer is not None:
                new[..., : self.length, :].copy_(self.rows())
                grown = nbytes(self.buffer)
            self.buffer = new
        self.buffer[..., self.length : need, :].copy_(rows)
        self.length = need
        return grown

    def rows(self) -> Float[Tensor, "batch pos d_model"]:
        """The stored rows (a view).

        Raises:
            ValueError: nothing has been stored yet.
        """
        if self.buffer is None:
            raise ValueError("no checkpoints stored yet: append rows first")
        return self.buffer[..., : self.length, :]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows: what the checkpoints cost."""
        if self.buffer is None:
            return 0
        per_row = self.buffer.numel() // self.buffer.shape[-2] * self.buffer.element_size()
        return self.length * per_row

    @property
    def reserved_bytes(self) -> int:
        """Bytes allocated, spare rows included."""
        return nbytes(self.buffer)


class KVDirectLayer(CacheLayer):
    """A global layer's cache: the active window, plus K/V recomputed for this forward."""

    def __init__(self, session: "_KVDirectSession", layer: int) -> None:
        super().__init__()
        self.session, self.layer = session, layer
        self.cumulative_length = 0  # absolute tokens seen; the active window is a suffix

    def append(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        assert self.keys is not None and self.values is not None
        self.cumulative_length += key_states.shape[-2]
        keys = self.keys = torch.cat([self.keys, key_states], dim=-2)
        values = self.values = torch.cat([self.values, value_states], dim=-2)
        old = self.session.take_recomputed(self.layer)
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
        if not self.ready or self.keys is None or self.values is None:
            return
        if self.keys.shape[-2] > keep:
            start = self.keys.shape[-2] - keep
            self.keys = self.keys[:, :, start:].clone()
            self.values = self.values[:, :, start:].clone()


class _KVDirectSession(CacheSession):
    def __init__(self, model: TransformerBridge, policy: "KVDirect") -> None:
        super().__init__(model)
        self.policy = policy
        self.spec = spec_for(model)
        self.global_layers = self.spec.global_layers(hf_config(model))
        self.cache = new_cache(model)
        for layer in self.global_layers:
            install(self.cache, layer, KVDirectLayer(self, layer))
        self.total = 0  # tokens fed so far
        self.evicted = 0  # tokens [0, evicted) live only as checkpoints
        self.chunks: list[tuple[int, Tensor]] = []  # (start, token ids) of every forward
        self.resid = {layer: ResidualCheckpoints() for layer in self.global_layers}
        self._recomputed: dict[int, tuple[Tensor, Tensor]] = {}
        self.projector = KVProjector(model)
        self._rotary: dict[str, tuple[Tensor, Any]] = {}  # per layer type, for one forward
        self._transient = 0
        self.shadow = new_cache(model) if policy.measure_deviation else None
        self.max_logit_deviation: float | None = 0.0 if policy.measure_deviation else None

    # --- recomputation -------------------------------------------------------------------
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
    def _hooks(self) -> list[tuple[str, Any]]:
        hooks = []
        for layer in self.global_layers:

            def at_layer(act: Tensor, hook: object, layer: int = layer) -> None:
                if self.policy.checkpoint == "layer":
                    self._recompute_layer(layer)
                    # The old buffer is alive while it is copied into the grown one.
                    grown = self.resid[layer].append(act.detach())
                    self._transient = max(self._transient, grown)

            hooks.append((self.spec.resid_pre_hook.format(layer=layer), at_layer))
        return hooks

    def _forward(self, ids: Int[Tensor, "1 pos"]) -> Float[Tensor, "1 vocab"]:
        if self.policy.checkpoint == "token":
            self._replay_evicted()
        with temporary_hooks(self.model, self._hooks()):
            logits = cached_forward(self.model, ids, self.cache)[:, -1]
        self._recomputed.clear()
        self._rotary.clear()
        self.chunks.append((self.total, ids))
        self.total += ids.shape[1]
        self.evicted = max(self.evicted, self.total - self.policy.budget)
        for layer in self.global_layers:
            layer_cache = installed(self.cache, layer)
            layer_cache.trim(self.total - self.evicted)
        if self.shadow is not None:
            with muted_hook_points(self.model):
                ref = cached_forward(self.model, ids, self.shadow)[:, -1]
            dev = (ref - logits).abs().max().item()
            self.max_logit_deviation = max(self.max_logit_deviation or 0.0, dev)
        self.memory.tokens_evicted = self.evicted
        self.memory.record(
            self.active_bytes(),
            self.checkpoint_bytes(),
            self._transient,
            reserved=self.reserved_bytes(),
        )
        self._transient = 0
        return logits

    def active_bytes(self) -> int:
        return kv_bytes(self.cache)

    def checkpoint_bytes(self) -> int:
        if self.policy.checkpoint == "token":
            return sum(nbytes(ids) for _, ids in self.chunks)
        return sum(self.resid[layer].nbytes for layer in self.global_layers)

    def reserved_bytes(self) -> int:
        """Checkpoint bytes allocated, spare rows included (layer mode); token ids as held."""
        if self.policy.checkpoint == "token":
            return self.checkpoint_bytes()
        return sum(self.resid[layer].reserved_bytes for layer in self.global_layers)

    @torch.no_grad()
    def prefill(self, tokens: Int[Tensor, "1 pos"]) -> Float[Tensor, "1 vocab"]:
        return self._forward(tokens)


@dataclass(frozen=True)
class KVDirect(CachePolicy):
    """Keep the last ``budget`` tokens' K/V; recompute older K/V from checkpoints.

    Args:
        budget: Tokens of K/V kept per global layer (>= 0).
        checkpoint: ``"layer"`` (residual per token per global layer) or ``"token"`` (token ids
            only; the evicted span is replayed through the whole stack).
        mode: ``"exact"`` (original chunk shapes, bitwise) or ``"fast"`` (one batched call).
        measure_deviation: Run a shadow full cache and report the max |logit difference|.

    Raises:
        TypeError: a non-int budget.
        ValueError: a negative budget, or an unknown checkpoint or mode.

    Example:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> full = residkit.generate(model, "abcdefgh", max_new_tokens=6, return_logits=True)
        >>> kvd = residkit.generate_kvdirect(model, "abcdefgh", max_new_tokens=6, budget=2)
        >>> torch.equal(full.tokens, kvd.tokens)
        True
        >>> KVDirect(8)
        KVDirect(budget=8, checkpoint='layer', mode='exact', measure_deviation=False)
    """

    budget: int = 64
    checkpoint: Checkpoint = "layer"
    mode: Mode = "exact"
    measure_deviation: bool = False
    name = "kvdirect"

    def __post_init__(self) -> None:
        non_negative_int("budget", self.budget)
        choice("checkpoint", self.checkpoint, CHECKPOINTS)
        choice("mode", self.mode, KVDIRECT_MODES)

    def open(self, model: TransformerBridge) -> CacheSession:
        return _KVDirectSession(model, self)
