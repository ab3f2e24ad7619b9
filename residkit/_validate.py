"""Argument checks shared by every public entry point: clear errors naming the argument.

A wrong type is a ``TypeError``, a wrong value a ``ValueError``; both name the argument and
the value. Booleans are never accepted where a number is expected (``True`` is an ``int`` to
Python, never to a reader).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = [
    "check_energy",
    "check_positions",
    "choice",
    "non_negative_int",
    "positive_int",
    "probability",
    "real",
]


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def non_negative_int(name: str, value: Any) -> int:
    """``value`` as an int ``>= 0``.

    Examples:
        >>> non_negative_int("budget", -1)
        Traceback (most recent call last):
        ...
        ValueError: budget must be a non-negative int, got -1
    """
    out = _int(name, value)
    if out < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return out


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int ``>= 1``."""
    out = _int(name, value)
    if out < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return out


def real(name: str, value: Any) -> float:
    """``value`` as a finite float (ints allowed, bools and NaN refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def probability(name: str, value: Any) -> float:
    """``value`` as a float in ``[0, 1]``."""
    out = real(name, value)
    if not 0.0 <= out <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return out


def flag(name: str, value: Any) -> bool:
    """``value`` if it is exactly True or False (a string such as ``"no"`` would be truthy).

    Raises:
        TypeError: anything else, naming it.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r:.80}")
    return value


def text_dict(name: str, value: Any) -> dict[str, str]:
    """``value`` if it is a dict of str -> str, else a TypeError naming it."""
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise TypeError(f"{name} must be a dict of name -> text, got {value!r:.80}")
    return value


def choice(name: str, value: Any, options: Iterable[str]) -> str:
    """``value`` if it is one of ``options``, else a ValueError listing them."""
    allowed = tuple(options)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, allowed))}")
    return value


def check_energy(energy: Any) -> float:
    """``energy`` as a float in ``[0, 1]``, or a ValueError naming the bad value.

    Typed ``Any`` on purpose: a string, ``None`` or ``True`` must reach this check and get a
    ValueError that names it, also when a run-time type checker wraps the callers.

    Examples:
        >>> check_energy(1)
        1.0
    """
    if isinstance(energy, bool) or not isinstance(energy, numbers.Real):
        raise ValueError(f"energy must be a number in [0, 1], got {energy!r}")
    value = float(energy)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"energy must be in [0, 1], got {energy!r}")
    return value


def check_positions(name: str, positions: Any) -> list[int]:
    """``positions`` as a list of ints (a TypeError names a float, a bool or a non-sequence).

    Examples:
        >>> check_positions("positions", range(3))
        [0, 1, 2]
    """
    if isinstance(positions, str | bytes) or not isinstance(positions, Iterable):
        raise TypeError(f"{name} must be a sequence of ints, got {positions!r:.80}")
    values = positions.tolist() if hasattr(positions, "tolist") else list(positions)
    bad = [p for p in values if isinstance(p, bool) or not isinstance(p, numbers.Integral)]
    if bad:
        raise TypeError(f"{name} must be ints, got {bad[0]!r} ({type(bad[0]).__name__})")
    return [int(p) for p in values]
