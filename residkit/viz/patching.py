"""The heatmap of an activation-patching sweep."""

from __future__ import annotations

from typing import TYPE_CHECKING

import plotly.graph_objects as go

if TYPE_CHECKING:
    from residkit.patching import PatchingSweep

__all__ = ["patching_heatmap"]


def patching_heatmap(sweep: PatchingSweep, *, title: str | None = None) -> go.Figure:
    """Heatmap of a :class:`~residkit.patching.PatchingSweep`, diverging at 0: layer (or
    ``L<layer>H<head>`` for ``hook="z"``) x ``position: token``."""
    labels = [f"{p}: {t!r}"[:24] for p, t in zip(sweep.positions, sweep.str_tokens, strict=True)]
    values = sweep.values.cpu()
    if values.ndim == 3:
        n_layers, _, n_heads = values.shape
        z = values.permute(0, 2, 1).reshape(n_layers * n_heads, -1)
        rows = [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]
    else:
        z, rows = values, [f"L{layer}" for layer in range(values.shape[0])]
    fig = go.Figure(
        go.Heatmap(
            z=z.numpy(),
            x=labels,
            y=rows,
            colorscale="RdBu",
            zmid=0.0,
            colorbar={"title": "metric"},
            hovertemplate="%{y}<br>%{x}<br>metric %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or f"activation patching: {sweep.hook}",
        xaxis_title="position: token",
        yaxis_title="layer" if values.ndim == 2 else "layer, head",
    )
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig
