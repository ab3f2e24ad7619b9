"""Cache policies, one small file each (as kvpress does). See :mod:`residkit.policies.base`."""

from residkit.policies.base import CachePolicy, CacheSession, MemoryStats
from residkit.policies.full import FullCache
from residkit.policies.kvdirect import KVDirect, per_token_bytes
from residkit.policies.none import NoCache

__all__ = [
    "CachePolicy",
    "CacheSession",
    "FullCache",
    "KVDirect",
    "MemoryStats",
    "NoCache",
    "per_token_bytes",
]
