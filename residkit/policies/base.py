"""The cache-policy interface shared by every decoding mode.

A policy is a small, frozen description (``FullCache()``, ``KVDirect(budget=16)``): a
dataclass whose fields are its settings, checked when it is made. ``policy.make_cache(model)``
gives a :class:`PolicyCache`, a ``transformers`` cache that holds the state of one sequence and
does the policy's work inside whatever forwards it is given: :func:`residkit.generate`'s loop,
transformers' ``generate``, or a user's own loop. A new policy is one small file
(``docs/howto/cache-policy.md`` has a worked example).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge.policy_cache import HookedCache

__all__ = [
    "CachePolicy",
    "MemoryStats",
    "PolicyCache",
    "chunked",
    "policy_classes",
    "resolve_policy",
]


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
            replay's K/V between two global layers and the span's residual in token mode; or
            the old checkpoint buffer while it is copied into a grown one.
        peak_total_bytes: The peak of active K/V during a forward + reserved checkpoints +
            that forward's transient bytes: the number to compare with the full cache's K/V
            (an upper bound: a forward's transient and active peaks need not coincide).
        tokens_evicted: Tokens whose K/V left the active cache.
        recompute_seconds: Wall time spent recomputing K/V from checkpoints.
        recomputed_tokens: Token-rows pushed through recomputation, summed over forwards and
            layers (layer checkpoints: rows through one layer's K/V projections; token
            checkpoints: rows through a whole forward). Sets the recompute's FLOP count.
        per_step: ``(active_kv_bytes, checkpoint_bytes)`` after each forward.
        batch_size: Rows of the batch the bytes are for (every row holds the same number of
            positions, padding included, so a row's share is the total over ``batch_size``).
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
    batch_size: int = 1

    @property
    def total_bytes(self) -> int:
        """Active K/V plus reserved checkpoints now, between forwards."""
        return self.active_kv_bytes + self.checkpoint_reserved_bytes

    def per_row(self) -> dict[str, float]:
        """Every byte count divided by :attr:`batch_size`: what one row of the batch holds."""
        rows = max(self.batch_size, 1)
        return {
            name: getattr(self, name) / rows
            for name in (
                "active_kv_bytes", "peak_active_kv_bytes", "checkpoint_bytes",
                "checkpoint_reserved_bytes", "peak_transient_bytes", "peak_total_bytes",
            )
        } | {"total_bytes": self.total_bytes / rows}  # fmt: skip

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
    # Caches and their layers replace their tensors rather than writing into them, so
    # references are a snapshot; lists and dicts they append to are copied one level.
    return {
        k: list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v
        for k, v in vars(obj).items()
    }


class PolicyCache(HookedCache):
    """A cache policy at work: a ``transformers`` cache holding one sequence's state.

    Made by :meth:`CachePolicy.make_cache`. It owns its layers, whatever the policy keeps
    besides (checkpoints, scores) and its :class:`MemoryStats` (``cache.memory``), and does its
    whole job inside the forwards it is given, through hooks it holds on the model while
    attached (``with cache:``; see :class:`residkit._bridge.policy_cache.HookedCache`).

    Examples:
        >>> import residkit, torch
        >>> model = residkit.load("zoo:llama")
        >>> with residkit.KVDirect(budget=4).make_cache(model) as cache:
        ...     _ = model(model.to_tokens("abcdefgh"), past_key_values=cache)
        >>> cache.memory.tokens_evicted  # 9 tokens fed (BOS included), 4 kept
        5
    """

    def __init__(self, model: TransformerBridge, policy: "CachePolicy") -> None:
        super().__init__(model, label=type(policy).__name__)
        self.policy = policy
        self.memory = MemoryStats()

    def _read_inputs(self, ids: Tensor) -> None:
        super()._read_inputs(ids)
        self.memory.batch_size = int(ids.shape[0])

    def stateful(self) -> list[Any]:
        """Every object whose attributes make up the cache's state (see :meth:`snapshot`)."""
        return [self, self.memory, *self.layers]

    def snapshot(self) -> list[tuple[Any, dict[str, Any]]]:
        """The cache's state now, cheaply (references, not copies of K/V)."""
        return [(obj, _state(obj)) for obj in self.stateful()]

    def restore(self, snapshot: list[tuple[Any, dict[str, Any]]]) -> None:
        """Put the cache back as it was when ``snapshot`` was taken (an atomic chat turn)."""
        attached = self._attached
        for obj, state in snapshot:
            vars(obj).clear()
            vars(obj).update(state)
        self._attached = attached


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
    """A description of how K/V are kept; :meth:`make_cache` puts it to work.

    Subclasses are frozen dataclasses: their ``repr`` lists their settings, two equal
    policies compare equal, and a policy can be reused for any number of generations. Each
    concrete subclass sets ``name``, the name :func:`resolve_policy` knows it by.

    Examples:
        >>> import residkit
        >>> policy = residkit.KVDirect(budget=4)
        >>> isinstance(policy, CachePolicy), policy == residkit.KVDirect(budget=4)
        (True, True)
    """

    name: ClassVar[str] = "policy"

    @abstractmethod
    def make_cache(self, model: TransformerBridge) -> PolicyCache:
        """A ``transformers`` cache that applies this policy in any forward given it.

        Use it attached: ``with policy.make_cache(model) as cache:``, then pass ``cache`` as
        ``past_key_values`` to the model's forward or to transformers' ``generate``.
        """

    @classmethod
    def for_budget(cls, budget: int) -> "CachePolicy":
        """This policy at a K/V budget, with its other settings scaled to it (for sweeps)."""
        return cls(budget)  # type: ignore[call-arg]

    @property
    def prefill_chunk_size(self) -> int | None:
        """Tokens per prefill forward the decoding loop should use (None: the whole prompt)."""
        return getattr(self, "prefill_chunk", None)


def policy_classes() -> dict[str, type[CachePolicy]]:
    """Every concrete policy class by its ``name`` (the one registry of policy names)."""
    out: dict[str, type[CachePolicy]] = {}
    todo = list(CachePolicy.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo += cls.__subclasses__()
        if not getattr(cls, "__abstractmethods__", None) and cls.__module__.startswith("residkit."):
            out.setdefault(cls.name, cls)
    return out


def resolve_policy(policy: Any, budget: int | None = None) -> CachePolicy:
    """A policy object from itself or its name, at ``budget`` where one is given.

    Examples:
        >>> resolve_policy("h2o", budget=8)
        H2O(budget=8, scope='global', prefill_chunk=None, recent=None)
        >>> resolve_policy("lru")
        Traceback (most recent call last):
        ...
        ValueError: unknown cache policy 'lru'; pass a CachePolicy or one of: full, h2o, kvdirect, none, snapkv, streaming, tova, window
    """
    if isinstance(policy, CachePolicy):
        return policy
    import residkit.policies  # noqa: F401 - every built-in policy class registers on import

    known = policy_classes()
    if isinstance(policy, str) and policy in known:
        cls = known[policy]
        return cls() if budget is None else cls.for_budget(budget)
    raise ValueError(
        f"unknown cache policy {policy!r}; pass a CachePolicy or one of: {', '.join(sorted(known))}"
    )
