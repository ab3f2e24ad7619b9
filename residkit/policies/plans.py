"""What KV-Direct keeps for each layer, and what that costs in bytes and recompute FLOPs.

A *plan* gives every managed layer one action:

- ``"kv"``: keep the layer's K/V for every token (nothing to recompute; a full cache layer);
- ``"checkpoint"``: keep the residual entering the layer for every token; evicted K/V are its
  norm and K/V projections (the paper's KV-Direct, ``checkpoint="layer"``);
- ``"rebuild"``: keep nothing for evicted tokens; their K/V are rebuilt by replaying the
  evicted span through the blocks from the nearest checkpoint below (or from the token ids,
  when there is none).

``checkpoint="stride"`` with ``stride=k`` puts a checkpoint at every k-th managed layer and
rebuilds the rest; ``keep_top=r`` keeps whole K/V at the top ``r`` layers of each group (the
most expensive to rebuild). k = 1 is ``"layer"``; no checkpoint at all is ``"token"``.

Costs are computed from the config: :func:`plan_bytes` (bytes held at context T, budget B) and
:func:`plan_flops` (multiply-add FLOPs of one decoding step's recompute), counted as
``2 * m * n * k`` per GEMM of every linear layer and attention product that runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Action",
    "Candidate",
    "Plan",
    "candidates",
    "choose",
    "peak_bound",
    "plan_bytes",
    "plan_flops",
    "resolve",
]

Action = Literal["kv", "checkpoint", "rebuild"]


@dataclass(frozen=True)
class Plan:
    """Per managed layer (in order), what is kept; see the module docstring."""

    layers: tuple[int, ...]
    actions: tuple[Action, ...]
    name: str

    def action(self, layer: int) -> Action:
        return self.actions[self.layers.index(layer)]

    @property
    def anchors(self) -> list[int]:
        """Layers whose residual is checkpointed."""
        return [
            layer for layer, a in zip(self.layers, self.actions, strict=True) if a == "checkpoint"
        ]

    def groups(self) -> dict[int, list[int]]:
        """``{anchor: [layers rebuilt from it]}``; anchor ``-1`` is the token ids (no
        checkpoint below). An anchor's own layer is listed first."""
        out: dict[int, list[int]] = {}
        anchor = -1
        for layer, action in zip(self.layers, self.actions, strict=True):
            if action == "checkpoint":
                anchor = layer
                out[anchor] = [layer]
            elif action == "rebuild":
                out.setdefault(anchor, []).append(layer)
        return out


def resolve(layers: Sequence[int], checkpoint: str, stride: int = 1, keep_top: int = 0) -> Plan:
    """The plan of a ``KVDirect(checkpoint=..., stride=..., keep_top=...)`` over ``layers``.

    Examples:
        >>> resolve([0, 1, 2, 3, 4], "stride", stride=2, keep_top=0).actions
        ('checkpoint', 'rebuild', 'checkpoint', 'rebuild', 'checkpoint')
        >>> resolve([0, 1, 2, 3], "stride", stride=4, keep_top=1).actions
        ('checkpoint', 'rebuild', 'rebuild', 'kv')
    """
    layers = tuple(layers)
    if checkpoint == "layer":
        every: Action = "checkpoint"
        return Plan(layers, (every,) * len(layers), "layer")
    if checkpoint == "token":
        none: Action = "rebuild"
        return Plan(layers, (none,) * len(layers), "token")
    actions: list[Action] = []
    for i in range(len(layers)):
        offset = i % stride
        group_size = min(stride, len(layers) - (i - offset))
        if offset == 0:
            actions.append("checkpoint")
        elif offset >= group_size - keep_top:
            actions.append("kv")
        else:
            actions.append("rebuild")
    name = f"stride {stride}" + (f", top {keep_top} kept" if keep_top else "")
    return Plan(layers, tuple(actions), name)


def _shape(config: Any) -> dict[str, int]:
    heads = config.num_attention_heads
    return {
        "d_model": config.hidden_size,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "d_head": getattr(config, "head_dim", None) or config.hidden_size // heads,
        # GPT-2 configs name it n_inner, None meaning 4 x d_model.
        "d_mlp": getattr(config, "intermediate_size", None)
        or getattr(config, "n_inner", None)
        or 4 * config.hidden_size,
    }


def plan_bytes(
    plan: Plan,
    config: Any,
    context: int,
    budget: int,
    dtype_bytes: int = 4,
    sliding: Sequence[int] = (),
) -> int:
    """Bytes a plan holds at ``context`` tokens and ``budget``.

    Active K/V: ``min(context, budget)`` tokens per layer, every token for ``"kv"`` layers;
    checkpoints: one ``d_model`` residual per token per anchor; token ids (int64) when some
    layer is rebuilt from the ids. ``sliding`` layers outside the plan keep the model's own
    window cache: ``sliding_window - 1`` tokens at most (transformers keeps the new token's
    K/V beside them only during the forward).
    """
    s = _shape(config)
    kv = 2 * s["kv_heads"] * s["d_head"] * dtype_bytes
    active = min(context, budget)
    window = getattr(config, "sliding_window", None) or context + 1
    total = len(sliding) * kv * min(context, window - 1)
    for action in plan.actions:
        total += kv * (context if action == "kv" else active)
        if action == "checkpoint":
            total += s["d_model"] * dtype_bytes * context
    if -1 in plan.groups():
        total += 8 * context
    return total


def _block_flops(s: dict[str, int], gated: bool, tokens: int) -> int:
    """One block's GEMM FLOPs on a span of ``tokens`` attending causally within itself."""
    qkvo = 2 * s["d_model"] * (2 * s["heads"] * s["d_head"] + 2 * s["kv_heads"] * s["d_head"])
    mlp = (3 if gated else 2) * 2 * s["d_model"] * s["d_mlp"]
    scores = 2 * 2 * s["heads"] * s["d_head"] * tokens * tokens  # QK^T and AV, full square
    return tokens * (qkvo + mlp) + scores


def plan_flops(plan: Plan, config: Any, evicted: int, gated: bool = True) -> int:
    """FLOPs of one decoding step's recompute of ``evicted`` tokens under ``plan``.

    A checkpoint layer costs its K and V projections; a group rebuilt from an anchor costs
    every block from the anchor up to its top rebuilt layer once, plus the Q, K and V
    projections of each rebuilt layer once more (each replay stops after them, and the next
    starts at that block); from the token ids, the same from block 0. Eager attention
    multiplies the full square of scores, masked after, so that is what is counted.
    """
    s = _shape(config)
    e = evicted
    if e == 0:
        return 0
    kv_proj = 2 * s["d_model"] * 2 * s["kv_heads"] * s["d_head"]
    qkv_proj = 2 * s["d_model"] * (s["heads"] + 2 * s["kv_heads"]) * s["d_head"]
    total = 0
    for anchor, members in plan.groups().items():
        rebuilt = [m for m in members if m != anchor]
        if anchor >= 0:  # the anchor's own K/V: its norm and K/V projections
            total += e * kv_proj
        if not rebuilt:
            continue
        start = max(anchor, 0)
        total += sum(_block_flops(s, gated, e) for _ in range(start, max(rebuilt)))
        # Replayed one layer at a time, in step with the forward (from an anchor's residual or
        # from the token ids): each rebuilt layer's replay stops after its Q/K/V projections,
        # and the next one runs that block again.
        total += len(rebuilt) * e * qkv_proj
    return total


@dataclass(frozen=True)
class Candidate:
    """One plan and the ``KVDirect`` arguments that run it (None: the full cache)."""

    plan: Plan
    kwargs: dict[str, Any] | None = field(hash=False)


STRIDES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def candidates(layers: list[int]) -> list[Candidate]:
    """Full cache, layer checkpoints, strides (2, 3, 4, 6, ... and all layers in one group)
    each with 0, 1 or all-but-one of its top layers' K/V kept, and token ids."""
    n = len(layers)
    keep: Action = "kv"
    out = [Candidate(Plan(tuple(layers), (keep,) * n, "full cache"), None)]
    out.append(Candidate(resolve(layers, "layer"), {"checkpoint": "layer"}))
    for k in sorted({s for s in STRIDES if s < n} | {n} - {1}):
        for top in sorted({0, 1, k - 1} - {k} if k > 1 else set()):
            kw = {"checkpoint": "stride", "stride": k, "keep_top": top}
            out.append(Candidate(resolve(layers, "stride", k, top), kw))
    out.append(Candidate(resolve(layers, "token"), {"checkpoint": "token"}))
    return out


def peak_bound(
    plan: Plan, config: Any, context: int, budget: int, chunk: int, sliding: tuple[int, ...]
) -> int:
    """An upper bound on a session's ``peak_total_bytes`` under ``plan`` (float32).

    Held: :func:`plan_bytes` with the active window grown by one forward's ``chunk``,
    checkpoint buffers with their 1/8 spare rows; transient: the largest replay cache (the
    blocks between two consecutive rebuilt layers, the whole span; replays run in step with the
    forward) or one layer's recomputed K/V, the residual rows fed in and carried out, rotary
    tables, and a checkpoint buffer copied while it grows.
    """
    kv = 2 * _heads(config)[1] * _heads(config)[2] * 4
    d = config.hidden_size * 4
    held = plan_bytes(plan, config, context, budget + chunk, sliding=sliding)
    anchors = len(plan.anchors)
    spare = anchors * d * (context // 8 + 1)
    groups = plan.groups()
    transient = 0
    if any(len(members) > 1 or anchor >= 0 for anchor, members in groups.items()):
        # Layers whose K/V one replay holds at once: the blocks between two consecutive
        # rebuilt layers (from the ids, block 0 is the first point), plus the one-wide stubs
        # the skipped blocks below hold (``residkit._bridge.replay``).
        depth = 1
        for anchor, members in groups.items():
            points = [max(anchor, 0), *[m for m in members if m != anchor]]
            for low, high in itertools.pairwise(points):
                depth = max(depth, high - low + 1)
        rotary = 4 * context * _heads(config)[2] * 4
        stubs = 2 * _heads(config)[1] * 4 * context * config.num_hidden_layers
        transient = depth * kv * context + 2 * d * context + rotary + stubs
    growth = d * context * 9 // 8 if anchors else 0
    return held + spare + transient + growth


def _heads(config: Any) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, d_head


def choose(config: Any, spec: Any, context: int, budget: int, limit: int, chunk: int) -> Candidate:
    """The plan with the least recompute whose :func:`peak_bound` is at most ``limit``.

    Raises:
        ValueError: no exact plan fits; the message gives the smallest limit one can meet.
    """
    layers = spec.managed_layers(config, "global")
    sliding = spec.sliding_layers(config)
    scored = []
    for c in candidates(layers):
        bound = peak_bound(c.plan, config, context, budget, chunk, sliding)
        flops = plan_flops(c.plan, config, max(0, context - budget), spec.gated_mlp)
        scored.append((flops, bound, c))
    fitting = [s for s in scored if s[1] <= limit]
    if not fitting:
        smallest = min(scored, key=lambda s: s[1])
        raise ValueError(
            f"memory_limit={limit} bytes is below every exact plan at context={context}, "
            f"budget={budget}: the smallest any plan can meet is {smallest[1]} bytes "
            f"({smallest[2].plan.name})"
        )
    return min(fitting, key=lambda s: (s[0], s[1]))[2]
