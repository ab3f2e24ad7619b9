"""Residual patching and activation-patching sweeps.

- :mod:`~residkit.patching.residual`: the whole residual stream (or some positions of it)
  replaced before one block; the blocks below do not run (:func:`patch_residual`).
- :mod:`~residkit.patching.sweep`: activation patching at every (layer, position[, head]) and
  hook point, batched (:func:`patching_sweep`, :func:`patched_logits`).
- :mod:`~residkit.patching.chunks`: which patched runs share a forward, and where each
  forward starts (layer and position).
- :mod:`~residkit.patching.attribution`: every cell's first-order estimate from one backward
  pass (:func:`attribution_sweep`); :mod:`~residkit.patching.compare`: how far it is from
  the exact sweep (:func:`compare_sweeps`).
"""

from residkit.patching.attribution import attribution_sweep
from residkit.patching.compare import SweepComparison, compare_sweeps
from residkit.patching.residual import patch_residual, run_patched, run_patched_to_final
from residkit.patching.sweep import HOOKS, PatchingSweep, patched_logits, patching_sweep

__all__ = [
    "HOOKS",
    "PatchingSweep",
    "SweepComparison",
    "attribution_sweep",
    "compare_sweeps",
    "patch_residual",
    "patched_logits",
    "patching_sweep",
    "run_patched",
    "run_patched_to_final",
]
