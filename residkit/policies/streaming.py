"""StreamingLLM: attention sinks plus a recent window.

Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks" (arXiv 2309.17453):
the first few tokens absorb a large share of attention whatever their content ("attention
sinks"); keeping their K/V next to a window of recent tokens keeps decoding stable where a
plain window collapses.

Conventions (shared ones in :mod:`residkit.policies._eviction`):

- Eviction after every forward, the prompt's included; the prompt itself is attended in full.
- Sinks are the tokens at absolute positions ``0 .. n_sink-1`` (BOS, where the tokenizer adds
  one, is position 0). ``n_sink`` is kvpress's name for it.
- Absolute positions are kept. The paper's reference code re-assigns rotary positions inside
  the cache (positions ``0 .. budget-1`` whatever the real distance); residkit keeps keys
  post-rotary at their original positions, as every other policy here does, so the only
  difference between policies is *which* tokens are kept.
- No scores: one kept set for all KV heads of a layer, so GQA changes nothing.
- The newest token is kept whenever ``budget > n_sink``; with ``budget == n_sink`` only the
  sinks are kept between steps.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from residkit._validate import non_negative_int
from residkit.policies._eviction import EvictionLayer, EvictionPolicy, top_k_sorted

__all__ = ["StreamingLLM", "streaming_keep"]


def streaming_keep(
    positions: Int[Tensor, "batch n_kv_heads n"], budget: int, n_sink: int
) -> Int[Tensor, "batch n_kv_heads k"]:
    """Indices of the sink positions (``0 <= p < n_sink``) and the most recent of the rest.

    Positions count from each row's first real token (left padding is negative, never a sink).

    Examples:
        >>> positions = torch.arange(8).view(1, 1, 8)
        >>> positions.gather(-1, streaming_keep(positions, 4, n_sink=1)).tolist()
        [[[0, 5, 6, 7]]]
    """
    # Sinks outrank every other token; the rest rank by recency.
    sink = (positions >= 0) & (positions < n_sink)
    priority = torch.where(sink, positions.new_tensor(2**62), positions)
    return top_k_sorted(priority, budget)


@dataclass(frozen=True)
class StreamingLLM(EvictionPolicy):
    """Keep ``n_sink`` first tokens and the most recent ``budget - n_sink`` tokens.

    Args:
        budget: Tokens kept per global layer between forwards, sinks included.
        n_sink: Attention-sink tokens kept from the start of the sequence (the paper uses 4).

    Raises:
        TypeError: ``budget`` or ``n_sink`` not an int.
        ValueError: ``budget`` or ``n_sink`` negative, or ``budget < n_sink``.

    Examples:
        >>> import residkit
        >>> from residkit.policies.streaming import StreamingLLM
        >>> model = residkit.load("zoo:llama")
        >>> with StreamingLLM(6, n_sink=2).make_cache(model) as cache:
        ...     _ = model(model.to_tokens("abcdefghij"), past_key_values=cache)
        >>> held = cache.held_positions()[0]
        >>> held[0, 0].tolist()
        [0, 1, 7, 8, 9, 10]
    """

    n_sink: int = 4
    name = "streaming"

    def __post_init__(self) -> None:
        super().__post_init__()
        non_negative_int("n_sink", self.n_sink)
        if self.budget < self.n_sink:
            raise ValueError(
                f"budget={self.budget} is smaller than n_sink={self.n_sink}: the budget "
                "includes the sinks"
            )

    @classmethod
    def for_budget(cls, budget: int) -> "StreamingLLM":
        """At small budgets, ``min(4, budget // 2)`` sinks, so half the budget follows each rule
        (the paper's 4 sinks would leave a budget of 4 nothing but sinks)."""
        return cls(budget, n_sink=min(4, budget // 2))

    def select(
        self, layer: EvictionLayer, pattern: Tensor | None, n_new: int, n_kv_heads: int
    ) -> Tensor | None:
        assert layer.positions is not None
        if layer.kept() <= self.budget:
            return None
        return streaming_keep(layer.relative_positions(), self.budget, self.n_sink)
