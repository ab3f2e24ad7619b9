"""Hook bookkeeping: adding, muting and counting hooks on a bridge.

residkit adds hooks only inside context managers and removes them in ``finally`` blocks;
these helpers make that checkable (:func:`hook_count`) and let internal recomputation run
without firing the user's hooks (:func:`muted`). They rely on two facts about TransformerLens
and torch, both named in :mod:`residkit._bridge.contract`: a ``HookPoint`` keeps its hooks in
torch's ``_forward_hooks`` / ``_forward_pre_hooks`` dicts (plus TransformerLens's ``fwd_hooks``
list), and a bridge component's ``forward`` can be replaced per instance.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

__all__ = [
    "OURS",
    "carries",
    "edit_watch",
    "foreign_hooked",
    "hook_count",
    "hook_points",
    "hooked",
    "muted",
    "muted_hook_points",
    "point_names",
    "replaced_forward",
    "run_last",
    "temporary_hooks",
]

OURS: set[Callable[..., Any]] = set()
"""Plain torch hook functions residkit registers itself (counted by :func:`hook_count`)."""


def hook_count(model: nn.Module) -> int:
    """Hooks and overrides residkit could leave behind on ``model``.

    Counts every hook on TransformerLens ``HookPoint``s (where user and residkit hooks live;
    TransformerLens also lists each in ``fwd_hooks``, which is not counted twice),
    every plain torch hook residkit registers elsewhere (:data:`OURS`), and every
    instance-level ``forward`` override on any submodule. The bridge wires torch hooks of its
    own on other modules at its first forward; those are not ours and are not counted. Tests
    compare this before and after every public call.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> before = hook_count(model)
        >>> with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda act, hook: None)]):
        ...     hook_count(model) - before
        1
        >>> hook_count(model) - before
        0
    """
    total = 0
    for module in model.modules():
        if isinstance(module, HookPoint):
            total += len(module._forward_hooks) + len(module._forward_pre_hooks)
            total += len(module._backward_hooks) + len(module._backward_pre_hooks)
        else:
            hooks = (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
            total += sum(hook in OURS for hook in hooks)
        total += "forward" in module.__dict__
    return total


@contextmanager
def temporary_hooks(
    model: Any, fwd_hooks: Sequence[tuple[str, Callable[..., Any]]]
) -> Iterator[None]:
    """Add TransformerLens forward hooks for the duration of the block, then remove them."""
    with model.hooks(fwd_hooks=fwd_hooks):
        yield


def hook_points(module: nn.Module | None) -> list[HookPoint]:
    """Every TransformerLens ``HookPoint`` under ``module`` (none for None)."""
    return [] if module is None else [m for m in module.modules() if isinstance(m, HookPoint)]


@contextmanager
def muted(points: list[HookPoint]) -> Iterator[None]:
    """Silence the given hook points for the block.

    Takes a list so callers that mute the same layer at every decoding step can build it once.
    Only HookPoints are muted: torch hooks the bridge uses internally keep running.
    """
    saved = [(p, p._forward_hooks, p._forward_pre_hooks) for p in points]
    saved = [entry for entry in saved if entry[1] or entry[2]]
    try:
        for p, _, _ in saved:
            p._forward_hooks = OrderedDict()
            p._forward_pre_hooks = OrderedDict()
        yield
    finally:
        for p, fwd, pre in saved:
            p._forward_hooks = fwd
            p._forward_pre_hooks = pre


@contextmanager
def muted_hook_points(module: nn.Module) -> Iterator[None]:
    """Silence every TransformerLens ``HookPoint`` under ``module`` for the block.

    Internal recomputation (K/V from checkpoints, for instance) runs the model's own layers;
    a user's hook on ``hook_k`` must see each real forward once, not our recomputes too.
    """
    with muted(hook_points(module)):
        yield


def point_names(model: Any, names: set[str] | list[str]) -> str:
    """Canonical hook names with the aliases the bridge also knows them by, for messages.

    Examples:
        >>> import residkit
        >>> point_names(residkit.load("zoo:llama"), ["blocks.1.attn.v.hook_out"])
        'blocks.1.attn.v.hook_out (also blocks.1.attn.hook_v)'
    """
    aliases: dict[str, list[str]] = {}
    for alias, point in getattr(model, "hook_dict", {}).items():
        if alias != point.name:
            aliases.setdefault(str(point.name), []).append(alias)
    parts = []
    for name in sorted(names):
        also = sorted(aliases.get(name, []))
        parts.append(f"{name} (also {', '.join(also)})" if also else name)
    return ", ".join(parts)


def _ours(point: HookPoint, ours: list[Callable[..., Any]]) -> int:
    return sum(any(h.user_hook is fn for fn in ours) for h in point.fwd_hooks)


def foreign_hooked(points: list[HookPoint], ours: list[Callable[..., Any]]) -> list[HookPoint]:
    """The points among ``points`` carrying hooks other than the callables ``ours``."""
    return [p for p in points if len(p._forward_hooks) + len(p._forward_pre_hooks) > _ours(p, ours)]


def carries(point: HookPoint, ours: list[Callable[..., Any]]) -> bool:
    """Whether one of the callables ``ours`` is hooked on ``point``."""
    return _ours(point, ours) > 0


def run_last(points: list[HookPoint], ours: list[Callable[..., Any]]) -> None:
    """Move the hooks ``ours`` on ``points`` after every other hook there, so they see the
    activation as the model consumes it, after hooks added since."""
    for point in points:
        for handle in point.fwd_hooks:
            if any(handle.user_hook is fn for fn in ours):
                cast(OrderedDict, point._forward_hooks).move_to_end(handle.hook.id)


def hooked(points: list[HookPoint]) -> list[HookPoint]:
    """The points among ``points`` that carry hooks right now."""
    return [p for p in points if p._forward_hooks or p._forward_pre_hooks]


@contextmanager
def edit_watch(points: list[HookPoint]) -> Iterator[set[str]]:
    """For the block, collect the names of the hook points among ``points`` whose hooks
    changed the activation passing through them (the output is not the input, bitwise).

    Only points that carry hooks are watched: the input is cloned before any of their hooks
    runs (so an in-place edit is seen too) and compared after the last one.
    """
    edited: set[str] = set()
    handles = []
    for point in hooked(points):
        before: list[torch.Tensor] = []

        def pre(module: Any, args: tuple[Any, ...], before: list[torch.Tensor] = before) -> None:
            if args and isinstance(args[0], torch.Tensor):
                before.append(args[0].detach().clone())

        def post(
            module: Any,
            args: tuple[Any, ...],
            output: Any,
            before: list[torch.Tensor] = before,
            name: str = str(point.name),
        ) -> None:
            if before:
                was = before.pop()
                same = isinstance(output, torch.Tensor) and output.shape == was.shape
                if not (same and torch.equal(output, was)):
                    edited.add(name)

        handles.append(point.register_forward_pre_hook(pre, prepend=True))
        handles.append(point.register_forward_hook(post))
    try:
        yield edited
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replaced_forward(
    modules: list[nn.Module], forward: Callable[..., torch.Tensor]
) -> Iterator[None]:
    """Temporarily give ``modules`` an instance-level ``forward`` (restored on exit).

    Uses ``object.__setattr__``: the bridge's components forward ordinary attribute writes
    to the wrapped HF module, which would leave the override somewhere ``del`` can't see.
    """
    try:
        for m in modules:
            object.__setattr__(m, "forward", forward)
        yield
    finally:
        for m in modules:
            if "forward" in m.__dict__:
                object.__delattr__(m, "forward")
