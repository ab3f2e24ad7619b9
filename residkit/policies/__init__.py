"""Cache policies, one small file each (as kvpress does). See :mod:`residkit.policies.base`."""

from residkit.policies._eviction import EvictionPolicy
from residkit.policies.base import CachePolicy, CacheSession, MemoryStats
from residkit.policies.full import FullCache
from residkit.policies.h2o import H2O
from residkit.policies.kvdirect import KVDirect
from residkit.policies.none import NoCache
from residkit.policies.snapkv import SnapKV
from residkit.policies.streaming import StreamingLLM
from residkit.policies.tova import TOVA
from residkit.policies.window import Window

__all__ = [
    "H2O",
    "TOVA",
    "CachePolicy",
    "CacheSession",
    "EvictionPolicy",
    "FullCache",
    "KVDirect",
    "MemoryStats",
    "NoCache",
    "SnapKV",
    "StreamingLLM",
    "Window",
]
