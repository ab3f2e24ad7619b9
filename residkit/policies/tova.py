"""TOVA: drop the token the current query attends to least.

Oren et al. 2024, "Transformers are Multi-State RNNs" (arXiv 2401.06104): Token Omission Via
Attention. Once the cache is full, each step drops the token with the lowest attention weight
from the newest query, averaged over heads (the paper found one shared choice per layer works
better than per-head choices). The official ``TOVACache.reduce`` keeps the top ``budget`` by
the last query row's head-averaged weights after every forward; residkit does the same.

Conventions (shared ones in :mod:`residkit.policies._eviction`):

- When: after every forward. After a prompt, the last prompt token's attention chooses the
  ``budget`` tokens kept (as the official cache does); after each decode step, exactly one
  token leaves. The prompt itself is attended in full.
- Per layer: the score is the last query row's weight averaged over *all* query heads, so
  every KV head keeps the same tokens (GQA changes nothing).
- Absolute positions are kept (post-rotary keys, never re-positioned).
- The newest token is *not* protected: it competes with its own attention-to-self weight,
  as in the paper (kvpress protects it; the official code does not).
"""

from dataclasses import dataclass

from jaxtyping import Bool, Float, Int
from torch import Tensor

from residkit.policies._eviction import EvictionLayer, EvictionPolicy, top_k_sorted

__all__ = ["TOVA", "tova_keep"]


def tova_keep(
    pattern: Float[Tensor, "batch n_heads q n"],
    budget: int,
    n_kv_heads: int,
    real: Bool[Tensor, "batch n_kv_heads n"] | None = None,
) -> Int[Tensor, "batch n_kv_heads k"]:
    """Indices of the ``budget`` tokens the last query row attends to most (head mean).

    Examples:
        >>> import torch
        >>> pattern = torch.tensor([[[[0.1, 0.6, 0.3]], [[0.5, 0.1, 0.4]]]])  # 2 heads, 1 row
        >>> tova_keep(pattern, budget=2, n_kv_heads=1).tolist()  # means 0.3, 0.35, 0.35
        [[[1, 2]]]
    """
    scores = pattern[:, :, -1, :].double().mean(1)  # [batch, n]
    index = top_k_sorted(scores.unsqueeze(1), budget, None if real is None else real[:, :1])
    return index.expand(-1, n_kv_heads, -1)


@dataclass(frozen=True)
class TOVA(EvictionPolicy):
    """Keep the ``budget`` tokens with the highest current attention (mean over heads).

    Args:
        budget: Tokens kept per global layer between forwards.

    Examples:
        >>> import residkit
        >>> from residkit.policies.tova import TOVA
        >>> model = residkit.load("zoo:llama")
        >>> gen = residkit.generate(model, "abcdefgh", max_new_tokens=4, policy=TOVA(3))
        >>> gen.stats.tokens_evicted
        9
    """

    name = "tova"
    needs_attention = True

    def summarize(self, pattern: Float[Tensor, "batch n_heads q k"]) -> Tensor:
        return pattern[:, :, -1:].clone()  # only the newest query row scores

    def select(
        self, layer: EvictionLayer, pattern: Tensor | None, n_new: int, n_kv_heads: int
    ) -> Tensor | None:
        assert pattern is not None
        if layer.kept() <= self.budget:
            return None
        return tova_keep(pattern, self.budget, n_kv_heads, layer.real())
