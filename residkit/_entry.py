"""What every public function that runs a model does first: check it, take it, put it in eval.

- **One operation per model at a time.** residkit adds hooks for the duration of a call;
  two threads running residkit on the same model would see each other's hooks and return
  wrong numbers without an error. Each model gets a re-entrant lock, held for the whole call:
  a second thread waits its turn and gets exactly what it would have got alone.
- **Eval mode.** Dropout makes two forwards of the same input differ, which no exactness
  claim survives. Every module in train mode (the flag is per module) is switched to eval for
  the call and switched back (:func:`residkit._bridge.guard.all_eval`).
- **Other threads' forwards wait.** A forward of the model that another thread starts during the
  call waits until the call ends, so it never runs through residkit's hooks
  (:func:`residkit._bridge.guard.hold_other_threads`).
- **The contract** (:mod:`residkit._bridge.contract`) is checked once per model.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from residkit._bridge import is_bridge
from residkit._bridge.guard import all_eval, hold_other_threads

__all__ = ["check_model", "entry", "exclusive"]

F = TypeVar("F", bound=Callable[..., Any])

_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def check_model(model: Any) -> None:
    """A TypeError unless ``model`` is a TransformerLens bridge (what :func:`residkit.load` gives).

    Examples:
        >>> check_model("zoo:llama")
        Traceback (most recent call last):
        ...
        TypeError: model must be a TransformerBridge from residkit.load(...), got 'zoo:llama' (str)
    """
    if not is_bridge(model):
        raise TypeError(
            "model must be a TransformerBridge from residkit.load(...), "
            f"got {model!r:.80} ({type(model).__name__})"
        )
    device = getattr(model.cfg, "device", None)
    if str(device) == "meta":
        raise ValueError("model is on the meta device (no weights); load it onto a real device")


def _lock(model: Any) -> threading.RLock:
    with _LOCKS_LOCK:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def exclusive(model: Any) -> Iterator[None]:
    """Hold ``model`` for the block: no other thread runs residkit or a forward on it meanwhile;
    every module is in eval mode, and those that were in train mode are put back after."""
    check_model(model)
    lock = _lock(model)
    with lock, all_eval(model), hold_other_threads(model, lock):
        yield


def entry(func: F) -> F:
    """Decorate a public function whose first argument is the model (see the module docstring)."""

    @functools.wraps(func)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        from residkit._bridge.contract import check_contract

        with exclusive(model):
            check_contract(model)
            return func(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
