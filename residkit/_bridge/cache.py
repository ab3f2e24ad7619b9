"""transformers' KV caches, as residkit uses them.

Every cache policy hands the bridge a ``transformers.DynamicCache`` whose global layers are
residkit's own :class:`CacheLayer` subclasses. This module is the only place that knows how
transformers' cache layers are built (``DynamicLayer``, lazy initialisation, the
``get_mask_sizes`` protocol), how a forward is given its cache, and how K/V are read back.

**The cache argument.** transformers 5.24 renamed the argument decoder layers pass to
attention from ``past_key_values`` to ``cache``; TransformerLens 4.3's attention bridges read
only the old name, so a cached forward silently ignores its cache. :func:`cached_forward`
adds, for the duration of one forward, a keyword pre-hook on each attention bridge that hands
``cache`` back under its old name. It does nothing on earlier releases, and it is never left
on the model.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from residkit._bridge.hooks import OURS

__all__ = [
    "CacheLayer",
    "CaptureCache",
    "Captured",
    "cache_argument_shim",
    "cached_forward",
    "install",
    "installed",
    "kv_bytes",
    "layer_kv",
    "nbytes",
    "new_cache",
    "repeated_cache",
]


def new_cache(model: Any) -> DynamicCache:
    """An empty ``DynamicCache`` laid out for the model (sliding layers where it has them)."""
    return DynamicCache(config=model.original_model.config)


def repeated_cache(cache: DynamicCache, rows: int) -> DynamicCache:
    """A copy of ``cache`` holding its K/V ``rows`` times over along the batch (``cache`` is
    left as it was): ``rows`` forwards that continue the same prefix, as one batch."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(rows)
    return out


def install(cache: DynamicCache, layer: int, cache_layer: CacheLayer) -> None:
    """Make ``cache_layer`` the cache of decoder layer ``layer``."""
    cache.layers[layer] = cache_layer


def installed(cache: Cache, layer: int) -> Any:
    """The cache layer ``cache`` uses for decoder layer ``layer``."""
    return cache.layers[layer]


def layer_kv(cache: Cache, layer: int) -> tuple[Tensor, Tensor] | None:
    """The keys and values ``cache`` holds for ``layer`` (``[batch, n_kv_heads, pos, d_head]``)."""
    held = cache.layers[layer]
    keys, values = getattr(held, "keys", None), getattr(held, "values", None)
    if isinstance(keys, Tensor) and isinstance(values, Tensor):
        return keys, values
    return None


def nbytes(*tensors: Tensor | None) -> int:
    """Bytes of the given tensors' elements (None counts 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def kv_bytes(cache: Cache) -> int:
    """Bytes of every K and V tensor a transformers cache currently holds."""
    return sum(nbytes(*(layer_kv(cache, layer) or ())) for layer in range(len(cache.layers)))


class CacheLayer(DynamicLayer):
    """Base of residkit's cache layers.

    Subclasses implement :meth:`append` (store a forward's new K/V, return what attention
    reads), :meth:`tokens_seen` (absolute tokens fed) and :meth:`mask_sizes`; this class speaks
    transformers' layer protocol for them. K/V live in ``self.keys`` / ``self.values``.
    """

    def __init__(self) -> None:
        super().__init__()

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store this forward's new K/V; return the K/V attention reads."""
        raise NotImplementedError

    def tokens_seen(self) -> int:
        """Absolute tokens fed through this layer so far."""
        raise NotImplementedError

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the mask for a chunk of ``query_length`` tokens."""
        raise NotImplementedError

    @property
    def ready(self) -> bool:
        """Whether the layer has been initialised by a first ``update``."""
        return bool(self.is_initialized)

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.append(key_states, value_states)

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return self.tokens_seen()

    def get_mask_sizes(self, query_length: Any, *args: Any, **kwargs: Any) -> tuple[int, int]:
        length = query_length if isinstance(query_length, int) else int(query_length.shape[-1])
        return self.mask_sizes(length)


class Captured(Exception):
    """Raised by :class:`CaptureCache` with the K/V attention was about to store."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        super().__init__("K/V captured")
        self.keys, self.values = keys, values


class CaptureCache(Cache):
    """A cache whose first ``update`` hands back (k, v) by stopping the layer's forward."""

    def __init__(self) -> None:
        super().__init__(layers=[])  # nothing is ever stored

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *a: Any, **k: Any
    ) -> Any:
        raise Captured(key_states, value_states)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return 0


def _rename_cache_kwarg(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if "cache" in kwargs and kwargs.get("past_key_values") is None:
        kwargs = dict(kwargs)
        kwargs["past_key_values"] = kwargs.pop("cache")
    return args, kwargs


OURS.add(_rename_cache_kwarg)


@contextmanager
def cache_argument_shim(model: Any) -> Iterator[None]:
    """For the block, attention bridges read a cache passed as ``cache`` (transformers >= 5.24)."""
    handles = [
        block.attn.register_forward_pre_hook(_rename_cache_kwarg, with_kwargs=True)
        for block in model.blocks
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def cached_forward(model: Any, tokens: Tensor, cache: Cache, **kwargs: Any) -> Any:
    """``model(tokens, past_key_values=cache, **kwargs)`` with the cache reaching attention.

    The bridge hands the cache to the HF model as ``past_key_values``; transformers >= 5.24
    warns about that name on every forward, which a user cannot act on, so it is silenced here.
    """
    with cache_argument_shim(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
        return model(tokens, past_key_values=cache, **kwargs)
