"""Checks that the installed transformers / TransformerLens pair behaves as residkit relies on.

residkit pins the versions it was measured with (``pyproject.toml``); these checks turn a
mismatch that would give silently wrong results into a clear error at the first call that
depends on it.
"""

import weakref
from importlib.metadata import version

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import DynamicCache

from residkit._hooks import muted_hook_points
from residkit.architectures import hf_config

__all__ = ["CacheNotWrittenError", "check_bridge_writes_cache"]

_WRITES_CACHE: "weakref.WeakKeyDictionary[TransformerBridge, bool]" = weakref.WeakKeyDictionary()


class CacheNotWrittenError(RuntimeError):
    """The bridge ignored the ``transformers.Cache`` passed to its forward."""


def check_bridge_writes_cache(model: TransformerBridge) -> None:
    """Raise :class:`CacheNotWrittenError` unless a forward fills the cache it is given.

    Every cache policy hands the bridge a ``transformers.Cache`` as ``past_key_values``.
    transformers 5.24 renamed the argument its decoder layers pass to attention
    (``past_key_values`` -> ``cache``) and TransformerLens 4.3's attention bridge reads only the
    old name, so the cache stays empty and every decoding step attends to itself alone:
    wrong tokens, no error. One 1-token forward per model (remembered) tells.
    """
    if _WRITES_CACHE.get(model):
        return
    cache = DynamicCache(config=hf_config(model))
    token = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad(), muted_hook_points(model):
        model(token, past_key_values=cache, return_type=None)
    if cache.get_seq_length() != 1:
        raise CacheNotWrittenError(
            f"the bridge did not write K/V into the cache passed as past_key_values "
            f"(transformers {version('transformers')}, transformer-lens "
            f"{version('transformer-lens')}): decoding with it would silently ignore every "
            "earlier token. transformers 5.24 renamed the argument attention receives to `cache`, "
            "which TransformerLens 4.3 does not read; install transformers<5.24 "
            "(pip install 'transformers<5.24'), as residkit's pyproject pins."
        )
    _WRITES_CACHE[model] = True
