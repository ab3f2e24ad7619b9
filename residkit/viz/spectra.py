"""Figures of ``W_Q W_K^T`` spectra: a rank heatmap per model and one head's spectrum.

Both take a :class:`residkit.spectra.QKSpectra`. :func:`residkit.widgets.rank_explorer`
builds its live figures from these same functions, so the widget and the static figures
cannot drift apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go

from residkit._validate import check_energy

if TYPE_CHECKING:  # only for annotations: residkit.spectra draws its figures with this module
    from residkit.spectra import QKSpectra

__all__ = ["check_head", "rank_heatmap", "spectrum"]

SIGMA = "\u03c3"  # escaped: ruff flags the bare Greek letter as a look-alike of "o"
_TOP = 3  # singular values shown on hover
_MAX_TEXT_CELLS = 600  # print the rank in each cell only while the numbers stay legible


def check_head(spectra: QKSpectra, layer: Any, head: Any) -> tuple[int, int]:
    """``(layer, head)`` as ints, or a ValueError naming the valid ranges."""
    for what, value, n in (("layer", layer, spectra.n_layers), ("head", head, spectra.n_heads)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{what} must be an int in 0..{n - 1}, got {value!r}")
        if not 0 <= value < n:
            raise ValueError(
                f"{what} {value} out of range: {spectra.model_name} has {n} "
                f"{what}s, valid {what}s are 0..{n - 1}"
            )
    return int(layer), int(head)


def _measure_label(measure: str) -> str:
    return f"energy ({SIGMA}\u00b2)" if measure == "sigma2" else f"\u03a3{SIGMA}"


def rank_heatmap(
    spectra: QKSpectra,
    energy: Any = 0.9,
    *,
    measure: str = "sigma2",
    title: str | None = None,
) -> go.Figure:
    """Effective rank of every head's ``W_Q W_K^T``, as a layer x query-head heatmap.

    Colour is ``rank / d_head`` on a fixed 0..1 scale, so models of different head sizes
    compare at a glance; hover shows the rank, the KV head and the top three singular
    values. Dotted lines separate the query-head groups that share a KV head.

    Args:
        spectra: From :func:`residkit.spectra.qk_spectra`.
        energy: Share in ``[0, 1]`` (see :meth:`QKSpectra.effective_rank`).
        measure: ``"sigma2"`` or ``"sigma"``.
        title: Replaces the default title (model, energy, measure).

    Raises:
        ValueError: bad energy or measure.

    Examples:
        >>> import residkit
        >>> from residkit.spectra import qk_spectra
        >>> fig = rank_heatmap(qk_spectra(residkit.load("zoo:llama")))
        >>> fig.data[0].type, fig.data[0].z.shape
        ('heatmap', (4, 4))
    """
    e = check_energy(energy)
    ranks = spectra.ranks(e, measure=measure).numpy()
    sv = spectra.singular_values.double().numpy()
    top = np.full((*ranks.shape, _TOP), np.nan)
    top[..., : min(_TOP, spectra.d_head)] = sv[..., :_TOP]
    kv = np.broadcast_to(np.array(spectra.kv_heads), ranks.shape)
    custom = np.concatenate([ranks[..., None], kv[..., None], top], axis=-1)
    show_text = ranks.size <= _MAX_TEXT_CELLS
    fig = go.Figure(
        go.Heatmap(
            z=ranks / spectra.d_head,
            x=list(range(spectra.n_heads)),
            y=list(range(spectra.n_layers)),
            customdata=custom,
            text=ranks.astype(str) if show_text else None,
            texttemplate="%{text}" if show_text else None,
            zmin=0.0,
            zmax=1.0,
            colorscale="Viridis",
            colorbar={"title": "rank / d_head"},
            hovertemplate=(
                "layer %{y}, head %{x} (KV head %{customdata[1]})<br>"
                f"rank %{{customdata[0]}} of {spectra.d_head} (%{{z:.0%}})<br>"
                f"top {SIGMA}: %{{customdata[2]:.4g}}, %{{customdata[3]:.4g}}, "
                "%{customdata[4]:.4g}"
                "<extra></extra>"
            ),
        )
    )
    group = spectra.n_heads // spectra.n_kv_heads
    for g in range(1, spectra.n_kv_heads if group > 1 else 0):
        fig.add_vline(x=g * group - 0.5, line={"color": "white", "dash": "dot", "width": 1})
    fold = ", norm gain folded" if spectra.norm_folded else ""
    fig.update_layout(
        title=title
        or (
            f"{spectra.model_name}: effective rank of W_Q W_K^T at {e:.0%} "
            f"{_measure_label(measure)}{fold}"
        ),
        xaxis={"title": "query head", "dtick": 1},
        yaxis={"title": "layer", "dtick": 1, "autorange": "reversed"},
    )
    return fig


def spectrum(
    spectra: QKSpectra,
    layer: int,
    head: int,
    *,
    energy: Any = None,
    measure: str = "sigma2",
) -> go.Figure:
    """Singular values of one head's ``W_Q W_K^T`` (log scale) and their cumulative share.

    Args:
        spectra: From :func:`residkit.spectra.qk_spectra`.
        layer: Layer index.
        head: Query-head index.
        energy: If given, mark it on the cumulative axis and the rank it gives.
        measure: What the cumulative curve accumulates: ``"sigma2"`` or ``"sigma"``.

    Raises:
        ValueError: layer or head out of range (the message gives the valid ranges), bad
            energy or measure.

    Examples:
        >>> import residkit
        >>> from residkit.spectra import qk_spectra
        >>> fig = spectrum(qk_spectra(residkit.load("zoo:llama")), 1, 2, energy=0.9)
        >>> len(fig.data), fig.layout.yaxis.type
        (2, 'log')
    """
    layer, head = check_head(spectra, layer, head)
    share = spectra.cumulative_share(layer, head, measure=measure).numpy()
    sv = spectra.singular_values[layer, head].double().numpy()
    k = np.arange(1, spectra.d_head + 1)
    kv = spectra.kv_heads[head]
    fig = go.Figure(
        [
            go.Scatter(
                x=k,
                y=np.where(sv > 0, sv, np.nan),  # a log axis cannot show exact zeros
                mode="lines+markers",
                name=f"{SIGMA}_k",
                hovertemplate=f"{SIGMA}_%{{x}} = %{{y:.4g}}<extra></extra>",
            ),
            go.Scatter(
                x=k,
                y=share,
                mode="lines",
                name=f"cumulative {_measure_label(measure)} share",
                yaxis="y2",
                hovertemplate="top %{x}: %{y:.1%}<extra></extra>",
            ),
        ]
    )
    title = f"{spectra.model_name} layer {layer} head {head} (KV head {kv})"
    if energy is not None:
        e = check_energy(energy)
        rank = int(spectra.ranks(e, measure=measure)[layer, head])
        title += f": rank {rank} of {spectra.d_head} at {e:.0%}"
        fig.add_hline(y=e, yref="y2", line={"dash": "dot", "color": "gray"})
        if rank > 0:
            fig.add_vline(x=rank, line={"dash": "dot", "color": "gray"})
    fig.update_layout(
        title=title,
        xaxis={"title": "k (singular value index)"},
        yaxis={"title": f"{SIGMA}_k", "type": "log"},
        yaxis2={
            "title": "cumulative share",
            "overlaying": "y",
            "side": "right",
            "range": [0, 1.02],
        },
        legend={"orientation": "h", "y": -0.2},
    )
    return fig
