"""FullCache: the model's own ``DynamicCache``, every token's K/V kept (the reference)."""

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers import DynamicCache

from residkit.architectures import hf_config
from residkit.policies.base import CachePolicy, CacheSession

__all__ = ["FullCache", "kv_bytes"]


def kv_bytes(cache: DynamicCache) -> int:
    """Bytes of every K and V tensor a transformers cache currently holds."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


class _FullSession(CacheSession):
    def __init__(self, model: TransformerBridge) -> None:
        super().__init__(model)
        self.cache = DynamicCache(config=hf_config(model))

    def _run(self, tokens: Tensor) -> Tensor:
        logits = self.model(tokens, past_key_values=self.cache)
        self.memory.record(kv_bytes(self.cache), 0)
        return logits[:, -1]

    @torch.no_grad()
    def prefill(self, tokens: Int[Tensor, "1 pos"]) -> Float[Tensor, "1 vocab"]:
        return self._run(tokens)


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
