"""The cache-policy interface shared by every decoding mode.

A policy is a small, frozen description (``FullCache()``, ``KVDirect(budget=16)``): a
dataclass whose fields are its settings, checked when it is made. ``policy.open(model)`` gives
a :class:`CacheSession` that holds the state of one generation. The engine in
:mod:`residkit.generation` drives sessions through ``prefill`` and ``step`` and knows nothing
else about them, so a new policy is one small file (``docs/`` has a worked example).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

__all__ = ["CachePolicy", "CacheSession", "MemoryStats", "chunked"]


@dataclass
class MemoryStats:
    """Bytes a session holds, updated after every forward.

    What is counted: K/V tensors (active, and recomputed or replayed ones while they are
    alive), residual checkpoints or token ids (with the spare rows of their growing buffers),
    and a recompute's own inputs (the norm output, the rotary tables). What is not: the
    model's weights, and the activations of a forward itself (hidden states, MLP
    intermediates, attention scores), which every policy pays alike; in token mode that
    includes the replay forward's activations.

    Attributes:
        active_kv_bytes: K/V attention reads directly, after the last forward (trimmed).
        peak_active_kv_bytes: The most K/V alive at once during any forward: the kept window
            plus the new chunk's K/V, before a policy trims them.
        checkpoint_bytes: Residual checkpoints (or token ids) kept instead of evicted K/V.
        checkpoint_reserved_bytes: Bytes allocated for them, spare rows of a growing buffer
            included (current and peak); equal to ``checkpoint_bytes`` where nothing is spare.
        peak_transient_bytes: Peak bytes alive during one layer's recompute and then freed: the
            recomputed K/V, the norm output of the recomputed rows and the rotary tables; the
            whole replayed cache in token mode; or the old checkpoint buffer while it is copied
            into a grown one.
        peak_total_bytes: The peak of active K/V during a forward + reserved checkpoints +
            that forward's transient bytes: the number to compare with the full cache's K/V
            (an upper bound: a forward's transient and active peaks need not coincide).
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
    peak_total_bytes: int = 0
    tokens_evicted: int = 0
    recompute_seconds: float = 0.0
    recomputed_tokens: int = 0
    per_step: list[tuple[int, int]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Active K/V plus reserved checkpoints now, between forwards."""
        return self.active_kv_bytes + self.checkpoint_reserved_bytes

    def record(
        self,
        active: int,
        checkpoints: int,
        transient: int = 0,
        *,
        reserved: int | None = None,
        during: int | None = None,
    ) -> None:
        """Record one forward: ``during`` is the K/V alive before any trim (default ``active``)."""
        during = active if during is None else during
        self.active_kv_bytes, self.checkpoint_bytes = active, checkpoints
        self.checkpoint_reserved_bytes = checkpoints if reserved is None else reserved
        self.peak_active_kv_bytes = max(self.peak_active_kv_bytes, during, active)
        self.peak_checkpoint_bytes = max(self.peak_checkpoint_bytes, checkpoints)
        self.peak_checkpoint_reserved_bytes = max(
            self.peak_checkpoint_reserved_bytes, self.checkpoint_reserved_bytes
        )
        self.peak_transient_bytes = max(self.peak_transient_bytes, transient)
        self.peak_total_bytes = max(
            self.peak_total_bytes, during + self.checkpoint_reserved_bytes + transient
        )
        self.per_step.append((active, checkpoints))


def _state(obj: Any) -> dict[str, Any]:
    # Sessions and cache layers replace their tensors rather than writing into them, so
    # references are a snapshot; lists and dicts they append to are copied one level.
    return {
        k: list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v
        for k, v in vars(obj).items()
    }


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

    def stateful(self) -> list[Any]:
        """Every object whose attributes make up the session's state (see :meth:`snapshot`)."""
        cache = getattr(self, "cache", None)
        layers = list(getattr(cache, "layers", []))
        return [self, self.memory, *([cache] if cache is not None else []), *layers]

    def snapshot(self) -> list[tuple[Any, dict[str, Any]]]:
        """The session's state now, cheaply (references, not copies of K/V)."""
        return [(obj, _state(obj)) for obj in self.stateful()]

    def restore(self, snapshot: list[tuple[Any, dict[str, Any]]]) -> None:
        """Put the session back as it was when ``snapshot`` was taken (an atomic chat turn)."""
        for obj, state in snapshot:
            vars(obj).clear()
            vars(obj).update(state)


def chunked(tokens: Tensor, size: int | None) -> list[Tensor]:
    """``tokens`` ``[batch, pos]`` in pieces of at most ``size`` positions (whole if None).

    Examples:
        >>> import torch
        >>> [c.shape[1] for c in chunked(torch.zeros(1, 10, dtype=torch.long), 4)]
        [4, 4, 2]
    """
    if size is None or tokens.shape[1] <= size:
        return [tokens]
    return list(tokens.split(size, dim=1))


@dataclass(frozen=True)
class CachePolicy(ABC):
    """A description of how K/V are kept; ``open`` makes a session.

    Subclasses are frozen dataclasses: their ``repr`` lists their settings, two equal
    policies compare equal, and a policy can be reused for any number of generations.

    Examples:
        >>> import residkit
        >>> policy = residkit.KVDirect(budget=4)
        >>> isinstance(policy, CachePolicy), policy == residkit.KVDirect(budget=4)
        (True, True)
    """

    name: ClassVar[str] = "policy"

    @abstractmethod
    def open(self, model: TransformerBridge) -> CacheSession:
        """Start a session for one generation on ``model``."""
