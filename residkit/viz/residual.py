"""Figures of the residual stream itself."""

import plotly.graph_objects as go
from jaxtyping import Float
from torch import Tensor

__all__ = ["residual_norm_figure"]


def residual_norm_figure(
    residuals: Float[Tensor, "layer batch pos d_model"],
    *,
    str_tokens: list[str] | None = None,
    title: str = "Residual-stream norm per layer",
) -> go.Figure:
    """Heatmap of ``||h||_2`` per (residual layer, position) for the first batch row.

    Rows are residual layers ``0..n_layers`` (the last one is after the final block), so a
    reader sees where the stream grows and which positions (often BOS) carry large norms.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> fig = residual_norm_figure(residkit.capture_residuals(model, "hi"))
        >>> fig.data[0].type
        'heatmap'
    """
    norms = residuals[:, 0].float().norm(dim=-1)  # [layer, pos]
    n_layers = norms.shape[0] - 1
    x = str_tokens if str_tokens is not None else [str(i) for i in range(norms.shape[1])]
    y = [f"resid_pre {i}" for i in range(n_layers)] + ["final"]
    fig = go.Figure(
        go.Heatmap(
            z=norms.cpu().numpy(),
            x=[f"{i}:{t}" for i, t in enumerate(x)],
            y=y,
            colorscale="Viridis",
            colorbar={"title": "||h||"},
            hovertemplate="%{y}<br>pos %{x}<br>norm %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(title=title, xaxis_title="position", yaxis_title="residual layer")
    fig.update_yaxes(autorange="reversed")
    return fig
