"""How many threads torch should use here: the cores this process may run on, less the ones
other processes keep busy.

torch starts one thread per core. On a machine where other processes already keep the cores
busy, those threads wait on each other at every parallel region, and small forwards get many
times slower (``benchmarks/threads.py`` measures it: see ``benchmarks/RESULTS.md``). The
``residkit`` command therefore sets, unless ``--threads N`` says otherwise, the number of
threads to the cores this process may use minus the one-minute load average of the rest of
the machine (at least one). Importing residkit changes nothing: the library leaves
``torch.set_num_threads`` to its caller.
"""

from __future__ import annotations

import os

__all__ = ["auto_threads", "cores"]


def cores() -> int:
    """CPU cores this process may run on (its affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_threads(load: float | None = None) -> int:
    """Threads for torch now: ``cores() - round(load)``, at least 1.

    Args:
        load: The load other processes put on the machine (default: the one-minute load
            average, which counts this process only once it runs).

    Examples:
        >>> auto_threads(load=0.0) == cores()
        True
        >>> auto_threads(load=1e9)
        1
    """
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cores(), cores() - round(load)))
