"""Cache policies, one small file each (as kvpress does). See :mod:`residkit.policies.base`.

Every policy makes a ``transformers`` cache (``policy.make_cache(model)``) that applies it in
any decoding loop; :func:`residkit.generate` is one such loop.
"""

from residkit.policies._eviction import EvictionCache, EvictionPolicy
from residkit.policies.base import (
    CachePolicy,
    MemoryStats,
    PolicyCache,
    policy_classes,
    resolve_policy,
)
from residkit.policies.full import FullCache
from residkit.policies.h2o import H2O
from residkit.policies.kvdirect import KVDirect
from residkit.policies.kvdirect_cache import KVDirectCache
from residkit.policies.none import NoCache
from residkit.policies.snapkv import SnapKV
from residkit.policies.streaming import StreamingLLM
from residkit.policies.tova import TOVA
from residkit.policies.window import Window

__all__ = [
    "H2O",
    "TOVA",
    "CachePolicy",
    "EvictionCache",
    "EvictionPolicy",
    "FullCache",
    "KVDirect",
    "KVDirectCache",
    "MemoryStats",
    "NoCache",
    "PolicyCache",
    "SnapKV",
    "StreamingLLM",
    "Window",
    "policy_classes",
    "resolve_policy",
]
