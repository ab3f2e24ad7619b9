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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Action", "Plan", "plan_bytes", "plan_flops", "resolve"]

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

    Example:
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
        "d_mlp": config.intermediate_size,
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

    A checkpoint layer costs its K and V projections; a group rebuilt from an anchor (or the
    ids) costs every block from the anchor up to its top rebuilt layer, plus that layer's Q, K
    and V projections (attention computes them together before it stores K/V). Eager attention
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
        if not rebuilt:  # the anchor alone: its norm and K/V projections
            total += e * kv_proj
            continue
        # Otherwise the replay from the anchor computes the anchor's K/V inside its block.
        start = max(anchor, 0)
        top = max(rebuilt)
        total += sum(_block_flops(s, gated, e) for _ in range(start, top))
        total += e * qkv_proj
    return total
