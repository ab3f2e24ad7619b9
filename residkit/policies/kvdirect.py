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
- ``"stride"`` with ``stride=k``: a residual checkpoint at every k-th managed layer only; the
  K/V of the layers between are rebuilt by replaying the evicted span through their blocks
  from the checkpoint below (:mod:`residkit.policies.plans`; ``keep_top=r`` keeps whole K/V
  at the top r layers of each group instead). k = 1 is ``"layer"``.
- ``"token"`` (the paper's "one vector per token" accounting, taken literally): only token ids;
  the evicted span is recomputed through the whole stack (a prefill of the evicted span).

``mode="exact"`` recomputes every original chunk with its original shape (the prompt as one
chunk, each decoded token alone; inside one call per layer, see :mod:`residkit.projector`),
so every step's logits are bitwise equal to full-cache decoding. ``mode="fast"`` recomputes
the evicted span as one chunk; with
``measure_deviation=True`` a shadow full cache runs alongside and the max |logit difference|
is reported.
"""

import re
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import (
    CacheLayer,
    cached_forward,
    edit_watch,
    hf_config,
    hook_points,
    install,
    installed,
    kv_bytes,
    muted_hook_points,
    nbytes,
    new_cache,
    point_names,
    temporary_hooks,
)
from residkit._validate import choice, non_negative_int, positive_int
from residkit.architectures import SCOPES, Scope, spec_for
from residkit.policies._eviction import check_window
from residkit.policies._recompute import Recompute
from residkit.policies.base import CachePolicy, CacheSession, chunked
from residkit.policies.checkpoints import ResidualCheckpoints
from residkit.policies.plans import Plan, choose, resolve
from residkit.projector import KVProjector

__all__ = [
    "CHECKPOINTS",
    "KVDIRECT_MODES",
    "Checkpoint",
    "KVDirect",
    "KVDirectLayer",
    "Mode",
]

Checkpoint = Literal["layer", "stride", "token"]
Mode = Literal["exact", "fast"]
CHECKPOINTS: tuple[Checkpoint, ...] = ("layer", "stride", "token")
# Everything up to the last block's attention: the unembedding side cannot change any K/V.
_BELOW_HEAD = re.compile(r"^(?!ln_final\.|unembed\.)")
KVDIRECT_MODES: tuple[Mode, ...] = ("exact", "fast")


class KVDirectLayer(CacheLayer):
    """A global layer's cache: the active window, plus K/V recomputed for this forward."""

    def __init__(self, session: "_KVDirectSession", layer: int) -> None:
        super().__init__()
        self.session, self.layer = session, layer
        self.cumulative_length = 0  # absolute tokens seen; the active window is a suffix
        self.keep_all = False  # a plan's "kv" layer: never trimmed, nothing recomputed

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
        if self.keep_all or not self.ready or self.keys is None or self.values is None:
            return
        if self.keys.shape[-2] > keep:
            start = self.keys.shape[-2] - keep
            self.keys = self.keys[:, :, start:].clone()
            self.values = self.values[:, :, start:].clone()


class _KVDirectSession(Recompute, CacheSession):
    def __init__(self, model: TransformerBridge, policy: "KVDirect") -> None:
        super().__init__(model)
        self.policy = policy
        self.spec = spec_for(model)
        config = hf_config(model)
        self.global_layers = self.spec.managed_layers(config, policy.scope)
        self.limit = self.spec.window_limit(config, policy.scope)
        self.plan: Plan = resolve(
            self.global_layers, policy.checkpoint, policy.stride or 1, policy.keep_top
        )
        self.cache = new_cache(model)
        for layer in self.global_layers:
            cache_layer = KVDirectLayer(self, layer)
            cache_layer.keep_all = self.plan.action(layer) == "kv"
            install(self.cache, layer, cache_layer)
        self.total = 0  # tokens fed so far
        self.evicted = 0  # tokens [0, evicted) live only as checkpoints
        self.chunks: list[tuple[int, Tensor]] = []  # (start, token ids) of every forward
        anchors = self.plan.anchors if policy.checkpoint != "token" else []
        self.resid = {layer: ResidualCheckpoints() for layer in anchors}
        self.groups = self.plan.groups()
        self._recomputed: dict[int, tuple[Tensor, Tensor]] = {}
        self.projector = KVProjector(model)
        self._rotary: dict[str, tuple[Tensor, Any]] = {}  # per layer type, for one forward
        self._transient = 0
        self.shadow = new_cache(model) if policy.measure_deviation else None
        self.max_logit_deviation: float | None = 0.0 if policy.measure_deviation else None
        self._watched = self._recompute_path()

    def _recompute_path(self) -> list[HookPoint]:
        """Hook points whose edits a recompute (run with hooks muted) would not repeat."""
        if self.policy.checkpoint == "token":  # the replay runs the whole stack up to the K/V
            below_the_head = [p for p in hook_points(self.model) if _BELOW_HEAD.match(str(p.name))]
            return below_the_head
        points = []
        for anchor, members in self.groups.items():
            top = max(members)
            for block in range(anchor, top):  # replayed whole, from the anchor's residual
                points += [
                    p
                    for p in hook_points(self.model.blocks[block])
                    if p.name != self.spec.resid_pre_hook.format(layer=anchor)
                ]
            points += self.projector.kv_path_points(top)
        return points

    def stateful(self) -> list[Any]:
        shadow = [self.shadow, *self.shadow.layers] if self.shadow is not None else []
        return [*super().stateful(), *self.resid.values(), *shadow]

    def _at_layer(self, layer: int, act: Tensor, hook: object) -> None:
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

    def _hooks(self) -> list[tuple[str, Any]]:
        if self.policy.checkpoint == "token":
            return []
        rebuilt = [m for a, members in self.groups.items() for m in members if m != a]
        return [
            (self.spec.resid_pre_hook.format(layer=layer), partial(self._at_layer, layer))
            for layer in self.resid
        ] + [
            (self.spec.resid_pre_hook.format(layer=layer), partial(self._at_rebuilt, layer))
            for layer in rebuilt
        ]

    def _forward(self, ids: Int[Tensor, "1 pos"]) -> Float[Tensor, "1 vocab"]:
        check_window(self.limit, self.total + ids.shape[1])
        planned = self.policy.context
        if planned is not None and self.total + ids.shape[1] > planned:
            raise ValueError(
                f"this KVDirect was planned for context={planned} tokens; the sequence would "
                f"reach {self.total + ids.shape[1]}"
            )
        if self.policy.checkpoint == "token":
            self._replay_evicted()
        with (
            edit_watch(self._watched) as edited,
            temporary_hooks(self.model, self._hooks()),
        ):
            logits = cached_forward(self.model, ids, self.cache)[:, -1]
        if edited:
            raise ValueError(
                f"hooks at {point_names(self.model, edited)} changed activations on KV-Direct's "
                "recompute path; recomputation runs with hooks muted, so the recomputed K/V "
                "would not be the ones this forward used. Remove those hooks or decode with "
                "FullCache"
                + (
                    " (with checkpoint='layer' only the attention inputs of each layer count)"
                    if self.policy.checkpoint == "token"
                    else ""
                )
            )
        self._recomputed.clear()
        self._rotary.clear()
        self.chunks.append((self.total, ids))
        self.total += ids.shape[1]
        self.evicted = max(self.evicted, self.total - self.policy.budget)
        during = self.active_bytes()  # the new chunk's K/V, before the window is trimmed
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
            during=during,
        )
        self._transient = 0
        return logits

    def active_bytes(self) -> int:
        return kv_bytes(self.cache)

    def checkpoint_bytes(self) -> int:
        if self.policy.checkpoint == "token":
            return sum(nbytes(ids) for _, ids in self.chunks)
        return sum(store.nbytes for store in self.resid.values())

    def reserved_bytes(self) -> int:
        """Checkpoint bytes allocated, spare rows included (layer mode); token ids as held."""
        if self.policy.checkpoint == "token":
            return self.checkpoint_bytes()
        return sum(store.reserved_bytes for store in self.resid.values())

    @torch.no_grad()
    def prefill(self, tokens: Int[Tensor, "1 pos"]) -> Float[Tensor, "1 vocab"]:
        for chunk in chunked(tokens, self.policy.prefill_chunk):
            logits = self._forward(chunk)
        return logits


@dataclass(frozen=True)
class KVDirect(CachePolicy):
    """Keep the last ``budget`` tokens' K/V; recompute older K/V from checkpoints.

    Args:
        budget: Tokens of K/V kept per global layer (>= 0).
        checkpoint: ``"layer"`` (residual per token per global layer), ``"stride"`` (a
            residual every ``stride`` managed layers, the layers between rebuilt by replay) or
            ``"token"`` (token ids only; the evicted span is replayed through the whole stack).
        mode: ``"exact"`` (original chunk shapes, bitwise) or ``"fast"`` (one batched call).
        measure_deviation: Run a shadow full cache and report the max |logit difference|.
        scope: ``"global"`` (default): the full-attention layers, while sliding-window layers
            keep the model's own window cache; ``"all"``: every layer, which matches the
            model's sliding windows while the sequence fits them (longer is a ValueError).
        prefill_chunk: Feed a prompt in forwards of at most this many tokens, trimming the
            active K/V after each, so a long prompt never holds more than
            ``budget + prefill_chunk`` tokens of K/V per layer. Bitwise equal to
            ``FullCache(prefill_chunk=...)`` with the same value in exact mode.
        stride: With ``checkpoint="stride"``: a checkpoint every ``stride`` managed layers.
        keep_top: With ``checkpoint="stride"``: keep the whole K/V of the top ``keep_top``
            layers of each group (below ``stride``).
        memory_limit: Bytes the session may hold at its peak (active K/V, checkpoints,
            transient; float32). The cheapest exact plan whose bound fits is chosen for
            ``context`` (:meth:`resolved`); ``checkpoint``/``stride``/``keep_top`` are then
            the plan's. Needs ``context``. ``prefill_chunk`` defaults to ``budget`` then.
        context: Tokens the run will reach at most (a longer sequence is a ValueError).

    User hooks: observing hooks see each real forward exactly once, as under the full cache
    (recomputes run with hooks muted). A hook that *changes* an activation on the recompute
    path (a layer's attention-input norm and K/V side; in token mode anything below the
    unembedding) raises a ValueError naming it, since the recomputed K/V would not carry
    the edit. Layer checkpoints store the residual after any edit of ``hook_resid_pre``, so
    such edits stay exact.

    Raises:
        TypeError: a non-int budget.
        ValueError: a negative budget, or an unknown checkpoint or mode.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> full = residkit.generate(model, "abcdefgh", max_new_tokens=6, return_logits=True)
        >>> kvd = residkit.generate_kvdirect(model, "abcdefgh", max_new_tokens=6, budget=2)
        >>> torch.equal(full.tokens, kvd.tokens)
        True
        >>> KVDirect(8)
        KVDirect(budget=8, checkpoint='layer', mode='exact', measure_deviation=False, prefill_chunk=None, scope='global', stride=None, keep_top=0, memory_limit=None, context=None)
    """

    budget: int = 64
    checkpoint: Checkpoint = "layer"
    mode: Mode = "exact"
    measure_deviation: bool = False
    prefill_chunk: int | None = None
    scope: Scope = "global"
    stride: int | None = None
    keep_top: int = 0
    memory_limit: int | None = None
    context: int | None = None
    name = "kvdirect"

    def __post_init__(self) -> None:
        non_negative_int("budget", self.budget)
        if self.prefill_chunk is not None:
            positive_int("prefill_chunk", self.prefill_chunk)
        choice("scope", self.scope, SCOPES)
        if not isinstance(self.measure_deviation, bool):
            raise TypeError(
                f"measure_deviation must be True or False, got {self.measure_deviation!r}"
            )
        choice("checkpoint", self.checkpoint, CHECKPOINTS)
        choice("mode", self.mode, KVDIRECT_MODES)
        if self.checkpoint == "stride":
            if self.stride is None:
                raise ValueError("checkpoint='stride' needs stride=k (a checkpoint every k layers)")
            positive_int("stride", self.stride)
            non_negative_int("keep_top", self.keep_top)
            if self.keep_top >= self.stride:
                raise ValueError(
                    f"keep_top={self.keep_top} must be below stride={self.stride}: each group "
                    "keeps its checkpoint layer"
                )
        elif self.stride is not None or self.keep_top:
            raise ValueError(
                f"stride={self.stride} and keep_top={self.keep_top} apply to checkpoint='stride' "
                f"only, not checkpoint={self.checkpoint!r}"
            )

        if self.memory_limit is not None:
            positive_int("memory_limit", self.memory_limit)
            if self.context is None:
                raise ValueError("memory_limit needs context=T: the plan is chosen for T tokens")
        if self.context is not None:
            positive_int("context", self.context)

    def resolved(self, model: TransformerBridge) -> CachePolicy:
        """The policy that runs: with ``memory_limit``, the plan :func:`residkit.policies.plans.choose`
        picks for ``model`` (a :class:`FullCache` when every layer's K/V fits); else self.

        Raises:
            ValueError: no exact plan fits ``memory_limit``; the message gives the smallest
                limit any plan can meet.
        """
        if self.memory_limit is None or self.context is None:
            return self
        from residkit.policies.full import FullCache

        chunk = self.prefill_chunk or max(1, self.budget)
        config = hf_config(model)
        pick = choose(config, spec_for(model), self.context, self.budget, self.memory_limit, chunk)
        if pick.kwargs is None:
            return FullCache(prefill_chunk=chunk)
        plan = {"stride": None, "keep_top": 0, **pick.kwargs}
        return replace(self, memory_limit=None, prefill_chunk=chunk, **plan)

    def open(self, model: TransformerBridge) -> CacheSession:
        policy = self.resolved(model)
        if policy is not self:
            return policy.open(model)
        return _KVDirectSession(model, self)
