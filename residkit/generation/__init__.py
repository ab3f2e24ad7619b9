"""One decoding engine for every cache policy: :func:`generate`."""

from residkit.generation.chat import Chat, TurnMemory
from residkit.generation.engine import (
    Generation,
    GenerationStats,
    generate,
    generate_kvdirect,
    resolve_policy,
)

__all__ = [
    "Chat",
    "Generation",
    "GenerationStats",
    "TurnMemory",
    "generate",
    "generate_kvdirect",
    "resolve_policy",
]
