"""How far an estimated patching sweep is from the exact one, cell by cell.

:func:`compare_sweeps` sets an estimate (:func:`~residkit.patching.attribution.attribution_sweep`)
beside the exact sweep (:func:`~residkit.patching.patching_sweep`) of the same prompts, metric
and hook. Both are compared as *effects*: each cell's value minus the corrupted run's metric
(what the patch changed). It reports:

- ``spearman``: rank correlation of the effects over every cell (is the ordering right?);
- ``top_k_overlap``: the share of the exact sweep's ``k`` largest ``|effect|`` cells that are
  among the estimate's ``k`` largest (does it find the same important cells?);
- ``sign_flips``: cells whose estimated effect has the other sign, among the cells whose exact
  ``|effect|`` is at least ``min_share`` of the largest (smaller ones flip on rounding alone);
- ``max_abs_error`` and ``mean_abs_error`` of the effects, and the largest exact ``|effect|``
  for scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from residkit.patching.sweep import PatchingSweep

__all__ = ["SweepComparison", "compare_sweeps"]


@dataclass(frozen=True)
class SweepComparison:
    """What :func:`compare_sweeps` measured.

    Attributes:
        exact: The exact sweep.
        estimate: The estimated sweep.
        top_k: ``k`` of :attr:`summary`'s top-k overlap.
        min_share: Cells count for sign flips when their exact ``|effect|`` is at least this
            share of the largest.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> metric = lambda logits: logits[:, -1, 5] - logits[:, -1, 6]
        >>> pair = (model, "The cat", "The dog", metric)
        >>> cmp = residkit.compare_sweeps(residkit.patching_sweep(*pair, progress=False),
        ...                               residkit.attribution_sweep(*pair))
        >>> cmp.table.columns.tolist()[-4:], cmp.figure().data[0].type
        (['exact', 'estimate', 'error', 'sign_flip'], 'heatmap')
    """

    exact: PatchingSweep
    estimate: PatchingSweep
    top_k: int = 10
    min_share: float = 0.05

    @property
    def table(self) -> pd.DataFrame:
        """One row per cell: ``layer, pos, token, [head,] exact, estimate, error, sign_flip``
        (effects; ``error = estimate - exact``)."""
        out = self.exact.table.drop(columns="value")
        exact = self.exact.effects.flatten().numpy()
        est = self.estimate.effects.flatten().numpy()
        out["exact"], out["estimate"], out["error"] = exact, est, est - exact
        big = abs(exact) >= self.min_share * abs(exact).max()
        out["sign_flip"] = big & ((exact > 0) != (est > 0))
        return out

    @property
    def summary(self) -> dict[str, float | int | str]:
        """The comparison in numbers (see the module docstring)."""
        t = self.table
        k = min(self.top_k, len(t))
        top = lambda col: set(t[col].abs().nlargest(k).index)  # noqa: E731
        ranks = t[["exact", "estimate"]].rank()
        return {
            "hook": self.exact.hook,
            "method": self.estimate.method,
            "cells": len(t),
            "spearman": float(ranks["exact"].corr(ranks["estimate"])),
            f"top_{k}_overlap": len(top("exact") & top("estimate")) / k,
            "sign_flips": int(t["sign_flip"].sum()),
            "max_abs_error": float(t["error"].abs().max()),
            "mean_abs_error": float(t["error"].abs().mean()),
            "max_abs_effect": float(t["exact"].abs().max()),
        }

    def __repr__(self) -> str:
        s = self.summary
        k = min(self.top_k, int(s["cells"]))
        return (
            f"SweepComparison({s['hook']}, {s['method']} vs exact: spearman {s['spearman']:.3f}, "
            f"top-{k} overlap {s[f'top_{k}_overlap']:.0%}, {s['sign_flips']} sign flips, "
            f"max |error| {s['max_abs_error']:.3g} of max |effect| {s['max_abs_effect']:.3g})"
        )

    def figure(self, *, title: str | None = None) -> go.Figure:
        """Exact effects, estimated effects (one colour scale) and their error, side by side."""
        from residkit.viz.patching import heatmap_grid

        exact, est = self.exact.effects, self.estimate.effects
        scale = max(float(exact.abs().max()), float(est.abs().max()), 1e-12)
        panels = [("exact", exact, scale), (self.estimate.method, est, scale),
                  ("error (estimate - exact)", est - exact, scale)]  # fmt: skip
        fig = make_subplots(
            rows=1, cols=3, subplot_titles=[p[0] for p in panels], shared_yaxes=True,
            horizontal_spacing=0.04,
        )  # fmt: skip
        for col, (_, values, bound) in enumerate(panels, start=1):
            x, y, z = heatmap_grid(self.exact, values)
            fig.add_trace(
                go.Heatmap(
                    z=z, x=x, y=y, colorscale="RdBu", zmin=-bound, zmax=bound,
                    showscale=col == 3, colorbar={"title": "effect"},
                    hovertemplate="%{y}<br>%{x}<br>%{z:.4f}<extra></extra>",
                ),
                row=1, col=col,
            )  # fmt: skip
        s = self.summary
        k = min(self.top_k, int(s["cells"]))
        fig.update_layout(
            title=title
            or f"{s['hook']}: {s['method']} vs exact (spearman {s['spearman']:.2f}, "
            f"top-{k} overlap {s[f'top_{k}_overlap']:.0%}, {s['sign_flips']} sign flips)",
            height=max(360, 18 * len(y) + 160),
        )
        fig.update_yaxes(autorange="reversed", type="category")
        fig.update_xaxes(type="category")
        return fig


def compare_sweeps(
    exact: PatchingSweep, estimate: PatchingSweep, *, top_k: int = 10, min_share: float = 0.05
) -> SweepComparison:
    """An estimated sweep against the exact one (see the module docstring).

    Raises:
        ValueError: the sweeps differ in hook, positions or shape, or ``top_k < 1``, or
            ``min_share`` outside ``[0, 1]``.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> metric = lambda logits: logits[:, -1, 5] - logits[:, -1, 6]
        >>> exact = residkit.patching_sweep(model, "The cat", "The dog", metric, progress=False)
        >>> est = residkit.attribution_sweep(model, "The cat", "The dog", metric)
        >>> cmp = residkit.compare_sweeps(exact, est, top_k=5)
        >>> sorted(cmp.summary)[:3], len(cmp.table) == exact.values.numel()
        (['cells', 'hook', 'max_abs_effect'], True)
    """
    for name, value in (("exact", exact), ("estimate", estimate)):
        if not isinstance(value, PatchingSweep):
            raise TypeError(f"{name} must be a PatchingSweep, got {value!r:.80}")
    if (exact.hook, exact.positions, tuple(exact.values.shape)) != (
        estimate.hook, estimate.positions, tuple(estimate.values.shape),
    ):  # fmt: skip
        raise ValueError(
            f"the sweeps differ: exact is {exact.hook} over {tuple(exact.values.shape)}, "
            f"estimate is {estimate.hook} over {tuple(estimate.values.shape)}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if (
        isinstance(min_share, bool)
        or not isinstance(min_share, int | float)
        or not (0.0 <= min_share <= 1.0)
    ):
        raise ValueError(f"min_share must be in [0, 1], got {min_share!r}")
    if torch.isnan(exact.values).any() or torch.isnan(estimate.values).any():
        raise ValueError("a sweep holds NaN values (a metric reading positions it did not name?)")
    return SweepComparison(exact, estimate, top_k=top_k, min_share=float(min_share))
