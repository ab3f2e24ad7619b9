"""Plotly figures. Every experiment's result object has a ``.figure()``; these are the shared ones."""

from residkit.viz.residual import residual_norm_figure

__all__ = ["residual_norm_figure"]
