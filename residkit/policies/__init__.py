"""Cache policies, one small file each (as kvpress does). See :mod:`residkit.policies.base`."""

from residkit.policies.base import CachePolicy, CacheSession, MemoryStats
from residkit.policies.full import FullCache
from residkit.policies.none import NoCache

__all__ = ["CachePolicy", "CacheSession", "FullCache", "MemoryStats", "NoCache"]
