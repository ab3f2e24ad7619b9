"""NoCache: no K/V kept at all; every step recomputes the whole sequence from the tokens."""

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import n_kv_heads, nbytes
from residkit.policies.base import CachePolicy, CacheSession

__all__ = ["NoCache"]


class _NoCacheSession(CacheSession):
    def __init__(self, model: TransformerBridge) -> None:
        super().__init__(model)
        self.tokens: Tensor | None = None

    def _run(self) -> Tensor:
        assert self.tokens is not None
        cfg = self.model.cfg
        # Kept: the token ids. Alive during a forward: one layer's K/V of the whole sequence.
        one_layer = self.tokens.shape[1] * 2 * n_kv_heads(self.model) * cfg.d_head
        one_layer *= next(self.model.parameters()).element_size()
        self.memory.record(0, nbytes(self.tokens), one_layer)
        return self.model(self.tokens)[:, -1]

    @torch.no_grad()
    def prefill(self, tokens: Int[Tensor, "1 pos"]) -> Float[Tensor, "1 vocab"]:
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens], dim=1)
        return self._run()


@dataclass(frozen=True)
class NoCache(CachePolicy):
    """Recompute everything from scratch every step, with no ``past_key_values``.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> full = residkit.generate(model, "ab", max_new_tokens=4, policy="full")
        >>> none = residkit.generate(model, "ab", max_new_tokens=4, policy=NoCache())
        >>> bool((full.tokens == none.tokens).all())
        True
    """

    name = "none"

    def open(self, model: TransformerBridge) -> CacheSession:
        return _NoCacheSession(model)
