"""FullCache: the model's own ``DynamicCache``, every token's K/V kept (the reference)."""

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import cached_forward, kv_bytes, new_cache
from residkit._validate import positive_int
from residkit.policies.base import CachePolicy, CacheSession, chunked

__all__ = ["FullCache"]


class _FullSession(CacheSession):
    def __init__(self, model: TransformerBridge, policy: "FullCache") -> None:
        super().__init__(model)
        self.policy = policy
        self.cache = new_cache(model)

    @torch.no_grad()
    def prefill(self, tokens: Int[Tensor, "1 pos"]) -> Float[Tensor, "1 vocab"]:
        for chunk in chunked(tokens, self.policy.prefill_chunk):
            logits = cached_forward(self.model, chunk, self.cache)
            self.memory.record(kv_bytes(self.cache), 0)
        return logits[:, -1]


@dataclass(frozen=True)
class FullCache(CachePolicy):
    """Keep every token's K/V (sliding-window layers keep what the model's cache keeps).

    Args:
        prefill_chunk: Feed a prompt in forwards of at most this many tokens (None: one
            forward). The reference for :class:`~residkit.policies.KVDirect` with the same
            ``prefill_chunk``: a chunked prefill runs other GEMM shapes than a whole one, so
            its logits differ from a one-chunk prefill's in the last bits.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> residkit.generate(model, "ab", max_new_tokens=3, policy=FullCache()).tokens.shape
        torch.Size([3])
    """

    prefill_chunk: int | None = None
    name = "full"

    def __post_init__(self) -> None:
        if self.prefill_chunk is not None:
            positive_int("prefill_chunk", self.prefill_chunk)

    def open(self, model: TransformerBridge) -> CacheSession:
        return _FullSession(model, self)
