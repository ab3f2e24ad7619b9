"""One decoding engine for every cache policy: :func:`generate`."""

from residkit.generation.engine import Generation, GenerationStats, generate, resolve_policy

__all__ = ["Generation", "GenerationStats", "generate", "resolve_policy"]
