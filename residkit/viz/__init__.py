"""Plotly figures. Every experiment's result object has a ``.figure()``; these are the shared ones."""

from residkit.viz.offline import offline_figures
from residkit.viz.patching import patching_heatmap
from residkit.viz.residual import residual_norm_figure
from residkit.viz.spectra import rank_heatmap, spectrum

__all__ = [
    "offline_figures",
    "patching_heatmap",
    "rank_heatmap",
    "residual_norm_figure",
    "spectrum",
]
