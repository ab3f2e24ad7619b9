"""Shared machinery of the eviction baselines (Window, StreamingLLM, H2O, SnapKV, TOVA).

An eviction policy drops K/V for good, unlike KV-Direct, which recomputes them. Every baseline
is a ``transformers`` cache (:class:`EvictionCache`, from ``policy.make_cache(model)``) whose
*global* layers are :class:`EvictionLayer` objects, so it works in any decoding loop, transformers'
``generate`` included. Sliding-window layers of the model keep the model's own sliding cache.

Conventions shared by every baseline:

- **When.** A forward attends to everything kept plus the whole new chunk (causally), then
  each layer is cut back to at most ``budget`` tokens. A prompt is therefore attended in full;
  decoding holds ``budget`` tokens between steps and attention reads ``budget + 1`` keys.
- **Positions.** Keys are stored post-rotary, at the absolute positions they were computed
  at; positions are never re-assigned. Each layer records the absolute position of every kept
  token per ``(batch, kv_head)``, in ascending order.
- **Granularity.** Eviction is per layer and may differ per KV head (H2O, SnapKV score per KV
  head; Window, StreamingLLM and TOVA keep one set for all heads). Every layer keeps the same
  *number* of tokens, so one mask serves every global layer.
- **GQA.** Attention weights come from the bridge's ``hook_pattern`` (eager attention,
  ``[batch, n_heads, q, k]``). Query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)``
  (``repeat_kv``); per-KV-head scores sum the query heads of the group.

The mask. HF builds one mask for all global layers from ``get_mask_sizes``. A layer holding
``kept`` of ``seen`` tokens reports ``(kept + q, seen - kept)``: the kept keys occupy
``[seen - kept, seen)`` for the mask, all of them in every new row's past, and the new keys
sit at their true positions ``[seen, seen + q)``, so the new rows stay causal among
themselves. Reporting offset ``0`` instead would let row ``i`` of a multi-token chunk see
later rows of the same chunk once anything was evicted (single-token steps are unaffected).

A padded batch. Rows are left padded, and the mask above reads the 2-D padding mask at the
positions ``[seen - kept, seen)``, the same for every row. That is right exactly when a row
holds padding only once it holds all its real tokens, and then the padding just before them:
every policy ranks padding below every real token and later padding above earlier
(:func:`top_k_sorted` with ``real``), padding queries cast no votes, and StreamingLLM's sinks
are each row's first real tokens. Each row then keeps what its prompt alone would keep.
"""

from abc import abstractmethod
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float, Int, Real
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import (
    CacheLayer,
    hf_config,
    install,
    installed,
    kv_bytes,
    n_kv_heads,
)
from residkit._validate import choice, non_negative_int, positive_int
from residkit.architectures import SCOPES, Scope, spec_for
from residkit.policies.base import CachePolicy, PolicyCache

__all__ = [
    "EvictionCache",
    "EvictionLayer",
    "EvictionPolicy",
    "check_window",
    "per_kv_head",
    "top_k_sorted",
]


def check_window(limit: int | None, tokens: int) -> None:
    """A ValueError when a ``scope="all"`` policy would hold more tokens than a sliding window."""
    if limit is not None and tokens > limit:
        raise ValueError(
            f"scope='all' manages the sliding-window layers too, which matches the model only "
            f"while the sequence fits their window of {limit} tokens; this one reaches {tokens}. "
            "Use scope='global' for longer sequences"
        )


def top_k_sorted(
    scores: Real[Tensor, "batch n_kv_heads n"],
    k: int,
    real: Bool[Tensor, "batch n_kv_heads n"] | None = None,
) -> Int[Tensor, "batch n_kv_heads k"]:
    """Indices of the ``k`` highest scores along the last dim, in ascending index order.

    Ascending order keeps the kept keys in position order, as an uncompressed cache has them.
    With ``real`` (False at left padding), padding ranks below every real token and later
    padding above earlier: a row keeps padding only once all its real tokens are kept, and
    then the padding just before them, which is what the shared attention mask expects there
    (see the module docstring). Scores must then be >= 0.

    Examples:
        >>> top_k_sorted(torch.tensor([[[0.5, 0.1, 0.9, 0.3]]]), 2).tolist()
        [[[0, 2]]]
        >>> real = torch.tensor([[[False, False, True, True]]])
        >>> top_k_sorted(torch.tensor([[[0.5, 0.1, 0.9, 0.3]]]), 3, real).tolist()
        [[[1, 2, 3]]]
    """
    k = min(k, scores.shape[-1])
    if real is not None:
        slot = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.float64)
        scores = torch.where(real, scores.double(), slot - scores.shape[-1])
    return torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values


def per_kv_head(
    pattern: Float[Tensor, "batch n_heads q k"], n_kv_heads: int
) -> Float[Tensor, "batch n_kv_heads q k"]:
    """Attention weights summed over the query heads that share each KV head (float64).

    Examples:
        >>> per_kv_head(torch.ones(1, 4, 1, 3), n_kv_heads=2).shape  # heads 0-1 -> 0, 2-3 -> 1
        torch.Size([1, 2, 1, 3])
    """
    b, h, q, k = pattern.shape
    if h % n_kv_heads:
        raise ValueError(f"n_heads={h} is not a multiple of n_kv_heads={n_kv_heads}")
    return pattern.double().view(b, n_kv_heads, h // n_kv_heads, q, k).sum(2)


class EvictionLayer(CacheLayer):
    """A global layer's cache: kept K/V, their absolute positions, and optional scores.

    Attributes:
        seen: Tokens fed so far (absolute); the next token's position.
        positions: ``[batch, n_kv_heads, kept]`` absolute positions of the kept tokens.
        scores: Per-token running scores aligned with ``positions`` (H2O), or None.
        padding: Leading padding tokens per row ``[batch]`` (None: no row is padded), set by
            the cache before each selection.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.positions: Tensor | None = None
        self.scores: Tensor | None = None
        self.padding: Tensor | None = None

    def relative_positions(self) -> Int[Tensor, "batch n_kv_heads kept"]:
        """Kept positions counted from each row's first real token (padding is negative)."""
        assert self.positions is not None
        if self.padding is None:
            return self.positions
        return self.positions - self.padding.to(self.positions.device).view(-1, 1, 1)

    def real(self) -> Bool[Tensor, "batch n_kv_heads kept"] | None:
        """Which kept slots hold real tokens (None: all of them)."""
        return None if self.padding is None else self.relative_positions() >= 0

    def append(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        b, h, q, _ = key_states.shape
        if self.positions is None:
            self.keys = key_states.new_zeros(b, h, 0, key_states.shape[-1])
            self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
            self.positions = torch.zeros(b, h, 0, dtype=torch.long, device=key_states.device)
        assert self.keys is not None and self.values is not None
        new = torch.arange(self.seen, self.seen + q, device=key_states.device)
        self.positions = torch.cat([self.positions, new.expand(b, h, q)], dim=-1)
        if self.scores is not None:
            self.scores = torch.cat([self.scores, self.scores.new_zeros(b, h, q)], dim=-1)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = keys, values
        self.seen += q
        return keys, values

    def kept(self) -> int:
        """Tokens currently held."""
        return 0 if self.positions is None else self.positions.shape[-1]

    def tokens_seen(self) -> int:
        return self.seen

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Called before update(): see the module docstring for why the offset is seen - kept.
        kept = self.kept()
        return kept + query_length, self.seen - kept

    def keep(self, index: Int[Tensor, "batch n_kv_heads k"]) -> None:
        """Keep only the tokens at ``index`` (per batch row and KV head)."""
        assert self.positions is not None and self.keys is not None and self.values is not None
        keys, values = self.keys, self.values
        self.keys = keys.gather(2, index[..., None].expand(*index.shape, keys.shape[-1]))
        self.values = values.gather(2, index[..., None].expand(*index.shape, values.shape[-1]))
        self.positions = self.positions.gather(2, index)
        if self.scores is not None:
            self.scores = self.scores.gather(2, index)


@dataclass(frozen=True)
class EvictionPolicy(CachePolicy):
    """Base of the eviction baselines: a budget and a rule choosing which tokens to keep.

    Attributes:
        budget: Tokens kept per managed layer (and KV head) between forwards.
        scope: ``"global"`` (default): the full-attention layers, while sliding-window layers
            keep the model's own window; ``"all"``: every layer, which agrees with the model's
            sliding windows only while the sequence fits them (longer is a ValueError).
        prefill_chunk: Feed a prompt in forwards of at most this many tokens, evicting after
            each (None: the whole prompt in one forward, which attends it in full). With it,
            no forward holds more than ``budget + prefill_chunk`` tokens of K/V per layer, and
            the policy never sees the whole prompt at once.
    """

    budget: int = 64
    scope: Scope = field(default="global", kw_only=True)
    prefill_chunk: int | None = field(default=None, kw_only=True)
    needs_attention: ClassVar[bool] = False

    def __post_init__(self) -> None:
        non_negative_int("budget", self.budget)
        choice("scope", self.scope, SCOPES)
        if self.prefill_chunk is not None:
            positive_int("prefill_chunk", self.prefill_chunk)

    @classmethod
    def for_budget(cls, budget: int) -> "EvictionPolicy":
        return cls(budget)

    def make_cache(self, model: TransformerBridge) -> "EvictionCache":
        return EvictionCache(model, self)

    def summarize(self, pattern: Float[Tensor, "batch n_heads q k"]) -> Tensor:
        """What :meth:`select` needs of one forward's attention, taken inside the hook.

        Holding a summary instead of the pattern keeps a long prompt from holding one
        ``q x k`` matrix per layer until the forward ends. Must not be a view of ``pattern``.
        """
        return pattern.clone()

    @abstractmethod
    def select(
        self, layer: EvictionLayer, pattern: Tensor | None, n_new: int, n_kv_heads: int
    ) -> Tensor | None:
        """Indices ``[batch, n_kv_heads, k]`` into ``layer`` to keep after a forward, or None.

        Called after every forward of ``n_new`` tokens with :meth:`summarize` of that forward's
        ``[batch, n_heads, n_new, kept]`` attention (None unless ``needs_attention``). May
        update ``layer.scores`` before choosing.
        """


class EvictionCache(PolicyCache):
    """One sequence under an :class:`EvictionPolicy`, as a ``transformers`` cache."""

    def __init__(self, model: TransformerBridge, policy: EvictionPolicy) -> None:
        super().__init__(model, policy)
        self.policy: EvictionPolicy = policy
        self.spec = spec_for(model)
        cfg = hf_config(model)
        self.global_layers = self.spec.managed_layers(cfg, policy.scope)
        self.limit = self.spec.window_limit(cfg, policy.scope)
        self.n_kv_heads = n_kv_heads(model)
        for layer in self.global_layers:
            install(self, layer, EvictionLayer())
        self._patterns: dict[int, Tensor] = {}
        self._during = 0

    def _layer(self, layer: int) -> EvictionLayer:
        cached = installed(self, layer)
        assert isinstance(cached, EvictionLayer)
        return cached

    def forward_hooks(self) -> list[tuple[str, Any]]:
        if not self.policy.needs_attention:
            return []
        return [
            (self.spec.pattern_hook.format(layer=layer), partial(self._keep_pattern, layer))
            for layer in self.global_layers
        ]

    def _keep_pattern(self, layer: int, act: Tensor, hook: object) -> None:
        pattern = act.detach()
        if self.mask is not None:
            # A padding query row attends to nothing real (its softmax is spread over masked
            # keys); it must not vote for any key.
            real_queries = self.mask[:, -pattern.shape[-2] :].to(pattern.device)
            pattern = pattern * real_queries[:, None, :, None].to(pattern.dtype)
        self._patterns[layer] = self.policy.summarize(pattern)

    def begin_forward(self, ids: Tensor) -> None:
        check_window(self.limit, self._seen() + ids.shape[1])
        self._patterns.clear()

    def end_forward(self) -> None:
        ids = self.forward_ids
        assert ids is not None
        try:
            during = kv_bytes(self)  # the new chunk's K/V are in before anything leaves
            for layer in self.global_layers:
                pattern = self._patterns.pop(layer, None)
                if self.policy.needs_attention and pattern is None:
                    raise RuntimeError(
                        f"{self.spec.pattern_hook.format(layer=layer)} did not fire; "
                        f"{type(self.policy).__name__} needs attention weights (eager attention)"
                    )
                cached = self._layer(layer)
                cached.padding = self.row_padding()
                index = self.policy.select(cached, pattern, ids.shape[1], self.n_kv_heads)
                if index is not None:
                    cached.keep(index)
        finally:
            self._patterns.clear()
        if self.global_layers:
            first = self._layer(self.global_layers[0])
            self.memory.tokens_evicted = first.seen - first.kept()
        self.memory.record(kv_bytes(self), 0, during=during)

    def _seen(self) -> int:
        return self._layer(self.global_layers[0]).seen if self.global_layers else 0

    def held_positions(self) -> dict[int, Int[Tensor, "batch n_kv_heads kept"]]:
        """Positions each global layer holds now, per ``(batch, kv_head)``, counted from each
        row's first real token (left padding, when a row keeps some, is negative).

        Examples:
            >>> import residkit
            >>> from residkit.policies.window import Window
            >>> model = residkit.load("zoo:llama")
            >>> with Window(3).make_cache(model) as cache:
            ...     _ = model(model.to_tokens("abcdefgh"), past_key_values=cache)
            >>> cache.held_positions()[0][0, 0].tolist()
            [6, 7, 8]
        """
        out = {}
        for layer in self.global_layers:
            cached = self._layer(layer)
            empty = torch.zeros(1, self.n_kv_heads, 0, dtype=torch.long)
            out[layer] = (
                cached.relative_positions().clone() if cached.positions is not None else empty
            )
        return out
