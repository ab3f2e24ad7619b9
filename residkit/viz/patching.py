"""The heatmap of an activation-patching sweep."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from torch import Tensor

if TYPE_CHECKING:
    from residkit.patching import PatchingSweep

__all__ = ["heatmap_grid", "patching_heatmap"]


def heatmap_grid(sweep: PatchingSweep, values: Tensor) -> tuple[list[str], list[str], np.ndarray]:
    """``values`` shaped like ``sweep.values`` as a heatmap: x labels (``position: token``),
    y labels (``L<layer>`` or ``L<layer>H<head>``), and the grid ``[rows, positions]``."""
    labels = [f"{p}: {t!r}"[:24] for p, t in zip(sweep.positions, sweep.str_tokens, strict=True)]
    values = values.detach().cpu().float()
    if values.ndim == 3:
        n_layers, _, n_heads = values.shape
        z = values.permute(0, 2, 1).reshape(n_layers * n_heads, -1)
        rows = [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]
    else:
        z, rows = values, [f"L{layer}" for layer in range(values.shape[0])]
    return labels, rows, z.numpy()


def patching_heatmap(sweep: PatchingSweep, *, title: str | None = None) -> go.Figure:
    """Heatmap of a :class:`~residkit.patching.PatchingSweep`, diverging at 0: layer (or
    ``L<layer>H<head>`` for ``hook="z"``) x ``position: token``."""
    labels, rows, z = heatmap_grid(sweep, sweep.values)
    values = sweep.values
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=labels,
            y=rows,
            colorscale="RdBu",
            zmid=0.0,
            colorbar={"title": "metric"},
            hovertemplate="%{y}<br>%{x}<br>metric %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title
        or f"activation patching: {sweep.hook}"
        + ("" if sweep.method == "exact" else f" ({sweep.method} estimate)"),
        xaxis_title="position: token",
        yaxis_title="layer" if values.ndim == 2 else "layer, head",
    )
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig
