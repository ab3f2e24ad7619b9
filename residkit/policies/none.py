"""NoCache: no K/V kept at all; every forward recomputes the K/V of everything before it.

As a ``transformers`` cache it keeps only the token ids it has been fed. When a forward
claims it, the ids seen so far are run through the model again (one forward, user hooks
muted, stopped before the unembedding) into a fresh cache of the model's own layers; the
forward's new tokens attend to those and the K/V are dropped when it ends. So the tokens are
the from-scratch recomputation's; only the past is recomputed as one chunk apart from the new
tokens.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import Piece, kv_bytes, nbytes, new_cache, replay_cache
from residkit.policies.base import CachePolicy, PolicyCache

__all__ = ["NoCache", "RecomputeAllCache"]


class RecomputeAllCache(PolicyCache):
    """Token ids only; each forward's past K/V replayed from them (see the module docstring)."""

    def __init__(self, model: TransformerBridge, policy: CachePolicy) -> None:
        super().__init__(model, policy)
        self.ids: Tensor | None = None
        self.positions: Tensor | None = None  # only where the forwards were given other ones
        self.seen = 0

    def begin_forward(self, ids: Tensor) -> None:
        if self.ids is None:
            self.layers = new_cache(self.model).layers
            return
        positions = self.positions
        if positions is None:
            positions = torch.arange(self.seen, device=ids.device).unsqueeze(0)
        mask = None if self.mask is None else self.mask[:, : self.seen]
        self.layers = replay_cache(self.model, Piece(self.ids, positions, mask)).layers

    def end_forward(self) -> None:
        now = self.forward_ids
        assert now is not None
        given = self.forward_positions
        if given is not None or self.positions is not None:
            start = self.seen
            past = self.positions
            if past is None:
                past = torch.arange(start, device=now.device).expand(now.shape[0], start)
            if given is None:
                given = torch.arange(start, start + now.shape[1], device=now.device)
            self.positions = torch.cat([past, given.expand(now.shape[0], -1)], dim=1)
        self.ids = now if self.ids is None else torch.cat([self.ids, now], dim=1)
        self.seen = self.ids.shape[1]
        self.memory.record(0, nbytes(self.ids, self.positions), kv_bytes(self))
        self.layers = new_cache(self.model).layers  # nothing is kept between forwards

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        self._claim()
        return self.seen


@dataclass(frozen=True)
class NoCache(CachePolicy):
    """Keep no K/V: every forward recomputes the past's from the token ids.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> full = residkit.generate(model, "ab", max_new_tokens=4, policy="full")
        >>> none = residkit.generate(model, "ab", max_new_tokens=4, policy=NoCache())
        >>> bool((full.tokens == none.tokens).all())
        True
    """

    name = "none"

    @classmethod
    def for_budget(cls, budget: int) -> "NoCache":
        return cls()  # keeps nothing, whatever the budget

    def make_cache(self, model: TransformerBridge) -> RecomputeAllCache:
        return RecomputeAllCache(model, self)
