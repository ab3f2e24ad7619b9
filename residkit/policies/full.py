"""FullCache: the model's own ``DynamicCache``, every token's K/V kept (the reference)."""

from dataclasses import dataclass

from transformer_lens.model_bridge import TransformerBridge
from transformers import DynamicCache

from residkit._bridge import kv_bytes
from residkit._validate import positive_int
from residkit.policies.base import CachePolicy, PolicyCache

__all__ = ["FullCache", "FullKVCache"]


class FullKVCache(PolicyCache):
    """The model's own cache layers, with residkit's memory accounting after every forward."""

    # Every layer is transformers' own, so these keep their meaning (beam search and
    # assisted decoding work as with a plain DynamicCache).
    crop = DynamicCache.crop  # type: ignore[assignment]
    batch_repeat_interleave = DynamicCache.batch_repeat_interleave
    batch_select_indices = DynamicCache.batch_select_indices  # type: ignore[assignment]
    reorder_cache = DynamicCache.reorder_cache  # type: ignore[assignment]

    def end_forward(self) -> None:
        self.memory.record(kv_bytes(self), 0)


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

    @classmethod
    def for_budget(cls, budget: int) -> "FullCache":
        return cls()  # keeps everything, whatever the budget

    def make_cache(self, model: TransformerBridge) -> FullKVCache:
        return FullKVCache(model, self)
