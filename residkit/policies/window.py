"""Window: keep the K/V of the last ``budget`` tokens, drop the rest (the recency baseline).

The simplest eviction rule, used as a baseline by every eviction paper (e.g. Xiao et al. 2023,
"Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453, Fig. 1b).

Conventions (shared ones in :mod:`residkit.policies._eviction`):

- Eviction after every forward, the prompt's included; the prompt itself is attended in full.
- Kept tokens keep their absolute positions (post-rotary keys, never re-positioned).
- No scores: one kept set for all KV heads of a layer, so GQA changes nothing.
- The newest token is always kept when ``budget >= 1``; ``budget = 0`` keeps nothing and each
  token attends only to itself.

Equivalence with transformers' sliding-window attention: HF's sliding layer keeps
``sliding_window - 1`` past tokens plus the new one, so during decoding ``Window(B)`` is
``sliding_window = B + 1``. The two agree end to end when the prompt is at most ``B + 1``
tokens (HF also windows inside the prompt; Window attends the prompt in full).
"""

from dataclasses import dataclass

from jaxtyping import Int
from torch import Tensor

from residkit.policies._eviction import EvictionLayer, EvictionPolicy, top_k_sorted

__all__ = ["Window", "window_keep"]


def window_keep(
    positions: Int[Tensor, "batch n_kv_heads n"], budget: int
) -> Int[Tensor, "batch n_kv_heads k"]:
    """Indices of the ``budget`` most recent positions (all of them if fewer).

    Examples:
        >>> import torch
        >>> window_keep(torch.tensor([[[0, 4, 5, 9]]]), 2).tolist()
        [[[2, 3]]]
    """
    return top_k_sorted(positions, budget)


@dataclass(frozen=True)
class Window(EvictionPolicy):
    """Keep the last ``budget`` tokens' K/V per global layer.

    Args:
        budget: Tokens kept per global layer between forwards (>= 0).

    Examples:
        >>> import residkit
        >>> from residkit.policies.window import Window
        >>> model = residkit.load("zoo:llama")
        >>> gen = residkit.generate(model, "abcdefgh", max_new_tokens=4, policy=Window(3))
        >>> gen.stats.tokens_evicted  # 9 prompt tokens (BOS included) + 3 fed, 3 kept
        9
    """

    name = "window"

    def select(
        self, layer: EvictionLayer, pattern: Tensor | None, n_new: int, n_kv_heads: int
    ) -> Tensor | None:
        assert layer.positions is not None
        if layer.kept() <= self.budget:
            return None
        return window_keep(layer.positions, self.budget)  # padding is oldest: ranked last
