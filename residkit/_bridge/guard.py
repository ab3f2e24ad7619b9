"""Keeping a residkit call to itself: every module in eval mode, other threads' forwards held.

A model's ``training`` flag is per module: ``model.eval()`` on the bridge leaves a block that the
user switched to train mode on its own (``model.original_model.train()``, or one block's
``.train()``) untouched, and its dropout breaks every exactness claim. :func:`all_eval` switches
each module that is in train mode to eval for the call and back after, one by one.

While residkit holds a model its hooks are on it. A forward another thread starts meanwhile
(``model(...)``, ``run_with_cache``, the wrapped transformers model) would run through them.
:func:`hold_other_threads` puts a forward pre-hook on the bridge and on the wrapped model for the
call: the owning thread passes (the lock is re-entrant); any other thread waits for the lock,
so its forward runs after the call, without residkit's hooks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["all_eval", "hold_other_threads"]


def _modules(model: Any) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for root in (model, getattr(model, "original_model", None)):
        if isinstance(root, nn.Module):
            for module in root.modules():
                seen.setdefault(id(module), module)
    return list(seen.values())


@contextmanager
def all_eval(model: Any) -> Iterator[None]:
    """Every module of ``model`` (the bridge and the model it wraps) in eval mode for the block;
    those that were in train mode are put back after, even on error."""
    trained = [m for m in _modules(model) if m.training]
    for module in trained:
        module.training = False
    try:
        yield
    finally:
        for module in trained:
            module.training = True


@contextmanager
def hold_other_threads(model: Any, lock: threading.RLock) -> Iterator[None]:
    """For the block, a forward of ``model`` from another thread waits until ``lock`` is free."""

    def wait(module: nn.Module, args: Any) -> None:
        with lock:  # the owner re-enters at once; anyone else waits for the call to end
            pass

    roots = [r for r in (model, getattr(model, "original_model", None)) if isinstance(r, nn.Module)]
    handles = [root.register_forward_pre_hook(wait) for root in roots]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
