"""H2O: heavy hitters (accumulated attention) plus a recent window.

Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models" (arXiv 2306.14048): a few tokens collect most of the attention mass over the
whole generation; keep those "heavy hitters" plus the most recent tokens.

Conventions (shared ones in :mod:`residkit.policies._eviction`):

- Scores: every token's attention, accumulated as unnormalised sums over every query row that
  saw it: all rows of the prompt, then every decoded row. A token's score starts at zero when
  it enters and is dropped with it when it is evicted.
- Per KV head: each KV head keeps its own set; its score sums the query heads of its group
  (GQA), which for the original multi-head models is one query head.
- Eviction after every forward, the prompt's included; the prompt itself is attended in full.
  After a forward, the ``recent`` most recent tokens are kept, then the ``budget - recent``
  highest-scoring of the others.
- Absolute positions are kept (post-rotary keys, never re-positioned).
- The newest token is protected by the recent window whenever ``recent >= 1``.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from residkit._validate import non_negative_int
from residkit.policies._eviction import EvictionLayer, EvictionPolicy, per_kv_head, top_k_sorted

__all__ = ["H2O", "h2o_keep"]


def h2o_keep(
    positions: Int[Tensor, "batch n_kv_heads n"],
    scores: Float[Tensor, "batch n_kv_heads n"],
    budget: int,
    recent: int,
    real: Bool[Tensor, "batch n_kv_heads n"] | None = None,
) -> Int[Tensor, "batch n_kv_heads k"]:
    """Indices of the ``recent`` most recent tokens plus the top scores among the others.

    Examples:
        >>> positions = torch.arange(6).view(1, 1, 6)
        >>> scores = torch.tensor([[[0.9, 0.1, 0.8, 0.2, 0.0, 0.0]]])
        >>> h2o_keep(positions, scores, budget=4, recent=2).tolist()  # heavy 0, 2; recent 4, 5
        [[[0, 2, 4, 5]]]
    """
    recent_idx = top_k_sorted(positions, recent)
    priority = scores.double().scatter(-1, recent_idx, float("inf"))
    return top_k_sorted(priority, budget, real)


@dataclass(frozen=True)
class H2O(EvictionPolicy):
    """Keep a recent window plus the heavy hitters of accumulated attention.

    Args:
        budget: Tokens kept per global layer and KV head between forwards.
        recent: Size of the recent window inside the budget; default (None) ``budget // 2``.

    Raises:
        TypeError: ``budget`` or ``recent`` not an int.
        ValueError: negative budget or recent, or ``recent > budget``.

    Examples:
        >>> import residkit
        >>> from residkit.policies.h2o import H2O
        >>> model = residkit.load("zoo:llama")
        >>> with H2O(4).make_cache(model) as cache:
        ...     _ = model(model.to_tokens("abcdefghij"), past_key_values=cache)
        >>> kept = cache.held_positions()[1]  # layer 1: [batch, n_kv_heads, kept]
        >>> tuple(kept.shape), kept[..., -2:].unique().tolist()  # the 2 most recent: 9, 10
        ((1, 2, 4), [9, 10])
    """

    name = "h2o"
    needs_attention = True

    recent: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recent is not None and non_negative_int("recent", self.recent) > self.budget:
            raise ValueError(f"recent={self.recent} is larger than budget={self.budget}")

    @property
    def recent_window(self) -> int:
        """Tokens of the recent window: ``recent``, or ``budget // 2`` when it is None."""
        return self.budget // 2 if self.recent is None else self.recent

    def summarize(self, pattern: Float[Tensor, "batch n_heads q k"]) -> Tensor:
        return pattern.double().sum(2, keepdim=True)  # only column sums accumulate

    def select(
        self, layer: EvictionLayer, pattern: Tensor | None, n_new: int, n_kv_heads: int
    ) -> Tensor | None:
        assert layer.positions is not None and pattern is not None
        if layer.scores is None:
            layer.scores = torch.zeros(
                layer.positions.shape, dtype=torch.float64, device=layer.positions.device
            )
        layer.scores = layer.scores + per_kv_head(pattern, n_kv_heads).sum(2)
        if layer.kept() <= self.budget:
            return None
        return h2o_keep(
            layer.positions, layer.scores, self.budget, self.recent_window, layer.real()
        )
