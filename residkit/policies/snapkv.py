"""SnapKV: compress the prompt once, by what its last queries attend to.

Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation" (arXiv
2404.14469, Algorithm 1): the last ``window_size`` queries of the prompt (the observation
window) vote for prefix tokens with their attention weights, summed over the window; the votes
are smoothed by a 1-D pooling (``kernel_size``, stride 1, same length); the top
``budget - window_size`` prefix tokens are kept, plus the whole observation window. The
argument names are kvpress's (``SnapKVPress``).

Conventions (shared ones in :mod:`residkit.policies._eviction`):

- When: at the end of every multi-token forward (the prompt; later chat turns too), if the
  layer holds more than ``budget`` tokens. The prompt itself is attended in full.
- Per KV head: each KV head keeps its own set; its votes sum the query heads of its group
  (GQA), the same ranking as kvpress's mean over the group.
- ``budget < window_size`` (or a chunk shorter than ``window_size``): the observation window
  shrinks to ``min(window_size, chunk, budget)`` rows; at ``budget <= window_size`` SnapKV
  keeps exactly the last ``budget`` prompt tokens, like :class:`~residkit.policies.window.Window`.
- Decoding: the paper compresses the prompt only and appends every decoded token, so its cache
  grows past the budget (``decode="append"``; then ``budget`` bounds the prompt only). By
  default (``decode="window"``) residkit holds the budget during decoding too: each decoded
  token evicts the oldest kept token, so every policy compared at budget B holds B tokens.
- Absolute positions are kept (post-rotary keys, never re-positioned).
- The newest token is protected: it is in the observation window at a prefill, and it is the
  most recent token under either decode rule.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from residkit._validate import choice, positive_int
from residkit.policies._eviction import EvictionLayer, EvictionPolicy, per_kv_head, top_k_sorted
from residkit.policies.window import window_keep

__all__ = ["SNAPKV_DECODE", "SNAPKV_POOLING", "SnapKV", "snapkv_keep"]

SNAPKV_DECODE = ("window", "append")
SNAPKV_POOLING = ("avg", "max")


def snapkv_keep(
    pattern: Float[Tensor, "batch n_kv_heads q n"],
    budget: int,
    window_size: int,
    kernel_size: int,
    pooling: str = "avg",
    real: Bool[Tensor, "batch n_kv_heads n"] | None = None,
) -> Int[Tensor, "batch n_kv_heads k"]:
    """Indices kept by SnapKV from one chunk's per-KV-head attention ``pattern``.

    The chunk's queries are the last ``q`` of the ``n`` keys. The last ``w = min(window_size,
    q, budget)`` queries vote; the ``budget - w`` prefix tokens with the highest pooled votes
    are kept, then the ``w`` window tokens.

    Examples:
        >>> pattern = torch.zeros(1, 1, 2, 8)
        >>> pattern[..., 3] = 1.0  # the observation window votes for token 3
        >>> snapkv_keep(pattern, budget=3, window_size=2, kernel_size=1).tolist()
        [[[3, 6, 7]]]
    """
    b, h, q, n = pattern.shape
    w = min(window_size, q, budget)
    prefix = n - w
    votes = pattern[..., q - w :, :prefix].double().sum(-2)  # [batch, kv, prefix]
    if prefix > 0 and kernel_size > 1:
        flat = votes.reshape(b * h, 1, prefix)
        pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
        votes = pool(flat, kernel_size, stride=1, padding=kernel_size // 2).reshape(b, h, prefix)
    chosen = top_k_sorted(votes, budget - w, None if real is None else real[..., :prefix])
    tail = torch.arange(prefix, n, device=pattern.device).expand(b, h, w)
    return torch.cat([chosen, tail], dim=-1)


@dataclass(frozen=True)
class SnapKV(EvictionPolicy):
    """Compress each prompt to ``budget`` tokens by the votes of its last ``window_size`` queries.

    Args:
        budget: Tokens kept per global layer and KV head after a prompt (and, with
            ``decode="window"``, between every forward).
        window_size: Observation window (the paper's default 32).
        kernel_size: Pooling kernel over the votes (odd, so the pooled votes keep their length).
        pooling: ``"avg"`` or ``"max"``.
        decode: ``"window"`` (default: hold the budget, evicting the oldest) or ``"append"``
            (the paper: keep every decoded token).

    Raises:
        TypeError: a non-int budget, window or kernel.
        ValueError: a non-positive window, an even or non-positive kernel, an unknown
            pooling or decode rule, or a negative budget.

    Examples:
        >>> import residkit
        >>> from residkit.policies.snapkv import SnapKV
        >>> model = residkit.load("zoo:llama")
        >>> with SnapKV(6, window_size=2).make_cache(model) as cache:
        ...     _ = model(model.to_tokens("abcdefghij"), past_key_values=cache)
        >>> kept = cache.held_positions()[1]
        >>> tuple(kept.shape), kept[..., -2:].unique().tolist()  # the window: 9, 10
        ((1, 2, 6), [9, 10])
    """

    window_size: int = 32
    kernel_size: int = 5
    pooling: str = "avg"
    decode: str = "window"
    name = "snapkv"
    needs_attention = True

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("window_size", self.window_size)
        if positive_int("kernel_size", self.kernel_size) % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size!r}")
        choice("pooling", self.pooling, SNAPKV_POOLING)
        choice("decode rule", self.decode, SNAPKV_DECODE)

    @classmethod
    def for_budget(cls, budget: int) -> "SnapKV":
        """At small budgets an observation window of ``min(32, budget // 2)`` queries (at least
        1): with the paper's 32, a budget <= 32 would keep exactly what Window keeps."""
        return cls(budget, window_size=max(1, min(32, budget // 2)))

    def summarize(self, pattern: Float[Tensor, "batch n_heads q k"]) -> Tensor:
        return pattern[:, :, -self.window_size :].clone()  # only the observation window votes

    def select(
        self, layer: EvictionLayer, pattern: Tensor | None, n_new: int, n_kv_heads: int
    ) -> Tensor | None:
        assert layer.positions is not None and pattern is not None
        if layer.kept() <= self.budget:
            return None
        if n_new > 1:
            grouped = per_kv_head(pattern, n_kv_heads)
            return snapkv_keep(
                grouped, self.budget, self.window_size, self.kernel_size, self.pooling, layer.real()
            )
        if self.decode == "window":
            return window_keep(layer.positions, self.budget)
        return None
