"""Figures of the residual stream itself."""

from typing import Literal

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float
from torch import Tensor

from residkit._validate import choice

__all__ = ["residual_norm_figure"]


def residual_norm_figure(
    residuals: Float[Tensor, "layer batch pos d_model"],
    *,
    str_tokens: list[str] | None = None,
    title: str = "Residual-stream norm per layer",
    scale: Literal["log", "linear"] = "log",
) -> go.Figure:
    """Heatmap of ``||h||_2`` per (residual layer, position) for the first batch row.

    Rows are residual layers ``0..n_layers`` (the last one is after the final block), so a
    reader sees where the stream grows and which positions (often BOS) carry large norms.

    Args:
        residuals: From :func:`residkit.capture_residuals`.
        str_tokens: Labels of the positions (default: their indices).
        title: The figure's title.
        scale: ``"log"`` (default) colours by log10 of the norm, with the colour bar in norms:
            the first token's norm is often tens of times the others' (up to 171x on SmolLM2), and on a linear scale
            it would take the whole colour range. ``"linear"`` colours by the norm itself.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> fig = residual_norm_figure(residkit.capture_residuals(model, "hi"))
        >>> fig.data[0].type
        'heatmap'
    """
    choice("scale", scale, ("log", "linear"))
    norms = residuals[:, 0].float().norm(dim=-1).cpu().numpy()  # [layer, pos]
    n_layers = norms.shape[0] - 1
    x = str_tokens if str_tokens is not None else [str(i) for i in range(norms.shape[1])]
    y = [f"resid_pre {i}" for i in range(n_layers)] + ["final"]
    colorbar: dict[str, object] = {"title": "||h||"}
    z = norms
    if scale == "log":
        z = np.log10(np.maximum(norms, 1e-12))  # an all-zero residual stays finite
        ticks = np.arange(np.floor(z.min()), np.ceil(z.max()) + 1)
        colorbar = {"title": "||h|| (log)", "tickvals": ticks.tolist(),
                    "ticktext": [f"{10**t:g}" for t in ticks]}  # fmt: skip
    fig = go.Figure(
        go.Heatmap(
            z=z,
            customdata=norms,
            x=[f"{i}:{t}" for i, t in enumerate(x)],
            y=y,
            colorscale="Viridis",
            colorbar=colorbar,
            hovertemplate="%{y}<br>pos %{x}<br>norm %{customdata:.3f}<extra></extra>",
        )
    )
    fig.update_layout(title=title, xaxis_title="position", yaxis_title="residual layer")
    fig.update_yaxes(autorange="reversed")
    return fig
