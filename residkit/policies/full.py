"""FullCache: the model's own ``DynamicCache``, every token's K/V kept (the reference)."""

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import cached_forward, kv_bytes, new_cache
from residkit.policies.base import CachePolicy, CacheSession

__all__ = ["FullCache"]


class _FullSession(CacheSession):
    def __init__(self, model: TransformerBridge) -> None:
        super().__init__(model)
        self.cache = new_cache(model)

    @torch.no_grad()
    def prefill(self, tokens: Int[Tensor, "1 pos"]) -> Float[Tensor, "1 vocab"]:
        logits = cached_forward(self.model, tokens, self.cache)
        self.memory.record(kv_bytes(self.cache), 0)
        return logits[:, -1]


@dataclass(frozen=True)
class FullCache(CachePolicy):
    """Keep every token's K/V (sliding-window layers keep what the model's cache keeps).

    Example:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> residkit.generate(model, "ab", max_new_tokens=3, policy=FullCache()).tokens.shape
        torch.Size([3])
    """

    name = "full"

    def open(self, model: TransformerBridge) -> CacheSession:
        return _FullSession(model)
