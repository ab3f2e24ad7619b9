"""The cache-policy interface shared by every decoding mode.

A policy is a small, frozen description (``FullCache()``, ``KVDirect(budget=16)``): a
dataclass whose fields are its settings, checked when it is made. ``policy.open(model)`` gives
a :class:`CacheSession` that holds the state of one generation. The engine in
:mod:`residkit.generation` drives sessions through ``prefill`` and ``step`` and knows nothing
else about them, so a new policy is one small file (``docs/`` has a worked example).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

__all__ = ["CachePolicy", "CacheSession", "MemoryStats"]


@dataclass
class MemoryStats:
    """Bytes a session holds, updated after every forward.

    Attributes:
        active_kv_bytes: K/V tensors attention reads directly (current and peak).
        checkpoint_bytes: Residual checkpoints (or token ids) kept instead of evicted K/V.
        checkpoint_reserved_bytes: Bytes allocated for them, spare rows of a growing buffer
            included (current and peak); equal to ``checkpoint_bytes`` where nothing is spare.
        transient_bytes: Peak bytes alive during one layer's recompute and then freed: the
            recomputed K/V, the norm output of the recomputed rows and the rotary tables, or
            the old checkpoint buffer while it is copied into a grown one (KV-Direct).
        tokens_evicted: Tokens whose K/V left the active cache.
        recompute_seconds: Wall time spent recomputing K/V from checkpoints.
        recomputed_tokens: Token-rows pushed through recomputation, summed over forwards and
            layers (layer checkpoints: rows through one layer's K/V projections; token
            checkpoints: rows through a whole forward). Sets the recompute's FLOP count.
        per_step: ``(active_kv_bytes, checkpoint_bytes)`` after each forward.
    """

    active_kv_bytes: int = 0
    peak_active_kv_bytes: int = 0
    checkpoint_bytes: int = 0
    peak_checkpoint_bytes: int = 0
    checkpoint_reserved_bytes: int = 0
    peak_checkpoint_reserved_bytes: int = 0
    peak_transient_bytes: int = 0
    tokens_evicted: int = 0
    recompute_seconds: float = 0.0
    recomputed_tokens: int = 0
    per_step: list[tuple[int, int]] = field(default_factory=list)

    def record(
        self, active: int, checkpoints: int, transient: int = 0, *, reserved: int | None = None
    ) -> None:
        self.active_kv_bytes, self.checkpoint_bytes = active, checkpoints
        self.checkpoint_reserved_bytes = checkpoints if reserved is None else reserved
        self.peak_active_kv_bytes = max(self.peak_active_kv_bytes, active)
        self.peak_checkpoint_bytes = max(self.peak_checkpoint_bytes, checkpoints)
        self.peak_checkpoint_reserved_bytes = max(
            self.peak_checkpoint_reserved_bytes, self.checkpoint_reserved_bytes
        )
        self.peak_transient_bytes = max(self.peak_transient_bytes, transient)
        self.per_step.append((active, checkpoints))


class CacheSession(ABC):
    """The state of one generation under one policy."""

    def __init__(self, model: TransformerBridge) -> None:
        self.model = model
        self.memory = MemoryStats()

    @abstractmethod
    def prefill(self, tokens: Int[Tensor, "1 pos"]) -> Float[Tensor, "1 vocab"]:
        """Append a chunk of tokens (the prompt, or a later chat turn); return its last logits."""

    def step(self, token: Int[Tensor, "1 1"]) -> Float[Tensor, "1 vocab"]:
        """Append one token; return its logits. A step is a chunk of one for every policy here."""
        return self.prefill(token)

    def close(self) -> None:  # noqa: B027 - optional hook, most sessions hold nothing external
        """Release anything the session put on the model (hooks, overrides)."""


@dataclass(frozen=True)
class CachePolicy(ABC):
    """A description of how K/V are kept; ``open`` makes a session.

    Subclasses are frozen dataclasses: their ``repr`` lists their settings, two equal
    policies compare equal, and a policy can be reused for any number of generations.
    """

    name: ClassVar[str] = "policy"

    @abstractmethod
    def open(self, model: TransformerBridge) -> CacheSession:
        """Start a session for one generation on ``model``."""
