"""One decoding engine for every cache policy: :func:`generate`."""

from residkit.generation.chat import Chat, TurnMemory
from residkit.generation.engine import generate, generate_kvdirect, resolve_policy
from residkit.generation.results import Generation, Generations, GenerationStats

__all__ = [
    "Chat",
    "Generation",
    "GenerationStats",
    "Generations",
    "TurnMemory",
    "generate",
    "generate_kvdirect",
    "resolve_policy",
]
