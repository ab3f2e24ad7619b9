"""KV-Direct: bounded active K/V, residual checkpoints, K/V recomputed on demand.

Arxiv 2603.19664 (Fig. 1, right): the most recent ``budget`` tokens keep their K/V; older
tokens keep a checkpoint, and their K/V are recomputed when attention needs them.

Mechanism: :meth:`KVDirect.make_cache` gives a :class:`~residkit.policies.kvdirect_cache.KVDirectCache`,
a ``transformers`` cache that recomputes evicted K/V inside the forwards it is given (its
module docstring says how), so KV-Direct runs in transformers' ``generate`` as in
:func:`residkit.generate`.

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
  the evicted span is replayed from the ids, one stretch of blocks per global layer in step with
  the forward (a prefill of the evicted span, but never a whole cache alive at once).

``mode="exact"`` recomputes every original chunk with its original shape (the prompt as one
chunk, each decoded token alone; inside one call per layer, see :mod:`residkit.projector`),
so every step's logits are bitwise equal to full-cache decoding. ``mode="fast"`` recomputes
the evicted span as one chunk; with ``measure_deviation=True``, :func:`residkit.generate` runs
a shadow full cache alongside and reports the max |logit difference|.
"""

from dataclasses import dataclass, replace
from typing import Literal

from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import hf_config
from residkit._validate import choice, non_negative_int, positive_int
from residkit.architectures import SCOPES, Scope, spec_for
from residkit.policies.base import CachePolicy, PolicyCache
from residkit.policies.kvdirect_cache import KVDirectCache, KVDirectLayer
from residkit.policies.plans import choose

__all__ = [
    "CHECKPOINTS",
    "KVDIRECT_MODES",
    "Checkpoint",
    "KVDirect",
    "KVDirectCache",
    "KVDirectLayer",
    "Mode",
]

Checkpoint = Literal["layer", "stride", "token"]
Mode = Literal["exact", "fast"]
CHECKPOINTS: tuple[Checkpoint, ...] = ("layer", "stride", "token")
KVDIRECT_MODES: tuple[Mode, ...] = ("exact", "fast")


@dataclass(frozen=True)
class KVDirect(CachePolicy):
    """Keep the last ``budget`` tokens' K/V; recompute older K/V from checkpoints.

    Args:
        budget: Tokens of K/V kept per global layer (>= 0).
        checkpoint: ``"layer"`` (residual per token per global layer), ``"stride"`` (a
            residual every ``stride`` managed layers, the layers between rebuilt by replay) or
            ``"token"`` (token ids only; the evicted span is replayed from the ids, layer by layer).
        mode: ``"exact"`` (original chunk shapes, bitwise) or ``"fast"`` (one batched call).
        measure_deviation: :func:`residkit.generate` runs a shadow full cache beside it and
            reports the max |logit difference| (``stats.max_logit_deviation``).
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
        >>> import residkit, torch
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

    @classmethod
    def for_budget(cls, budget: int) -> "KVDirect":
        return cls(budget)

    def make_cache(self, model: TransformerBridge) -> PolicyCache:
        policy = self.resolved(model)
        if policy is not self:
            return policy.make_cache(model)
        return KVDirectCache(model, self)
