"""What :func:`residkit.compare_policies` returns: one row per (policy, budget), and its figure."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from residkit.comparison.readings import KL_READINGS, READING_LABELS, column
from residkit.metrics import mean_interval

__all__ = ["PolicyComparison", "summarise"]


@dataclass
class PolicyComparison:
    """The result of :func:`compare_policies`.

    Attributes:
        rows: One dict per (policy, budget); see :attr:`table`.
        steps: One row per (policy, budget, prompt, step): ``match`` (bool) and one column per
            KL reading (``kl``, ``free_kl``, ``own_kl``; NaN where not measured).

    Examples:
        >>> import residkit
        >>> cmp = residkit.compare_policies(residkit.load("zoo:llama"), "abcdefgh", budgets=[2],
        ...     policies=["kvdirect"], max_new_tokens=3, progress=False)
        >>> cmp.table[["policy", "budget", "token_match", "mean_kl"]].values.tolist()
        [['kvdirect', 2, 100.0, 0.0]]
    """

    rows: list[dict[str, object]]
    steps: pd.DataFrame

    def __repr__(self) -> str:
        t = self.table
        return (
            f"PolicyComparison({t['policy'].nunique()} policies x {t['budget'].nunique()} "
            f"budgets, {self.steps['prompt'].nunique() if len(self.steps) else 0} prompts)"
        )

    @property
    def table(self) -> pd.DataFrame:
        """One row per (policy, budget): ``token_match`` (%, mean over prompts) with
        ``token_match_ci`` (half-width of its 95% interval over prompts), spread and range;
        per measured KL reading its mean, max and ``..._ci`` (:func:`~residkit.comparison.readings.column`
        names them); and memory per row, largest over prompts: ``peak_active_kv_bytes`` (K/V
        alive during a forward), ``peak_checkpoint_bytes``, ``peak_total_bytes`` (those plus
        transients, the number to compare at equal memory) and ``held_bytes`` (active K/V and
        checkpoints between forwards, after the last one)."""
        return pd.DataFrame(self.rows)

    @property
    def readings(self) -> tuple[str, ...]:
        """The KL readings measured (see :mod:`residkit.comparison.readings`)."""
        return tuple(r for r in KL_READINGS if self.table[column(r)].notna().any())

    def figure(self, *, title: str | None = None) -> go.Figure:
        """Heatmaps over (budget, policy), like the paper's Figure 4: token match (%) on top,
        then the mean KL of each reading measured."""
        table = self.table
        policies = list(dict.fromkeys(table["policy"]))
        budgets = list(dict.fromkeys(table["budget"]))
        panels = [("token_match", "token match with the full cache (%)", "Blues", ".0f")]
        for reading in self.readings:
            label = f"mean KL(full || policy), {READING_LABELS[reading]}"
            panels.append((column(reading), label, "RdBu_r", ".2g"))
        fig = make_subplots(
            rows=len(panels),
            cols=1,
            shared_xaxes=True,
            vertical_spacing=0.1,
            subplot_titles=[label for _, label, _, _ in panels],
        )
        for i, (name, _, scale, fmt) in enumerate(panels, start=1):
            grid = table.pivot(index="policy", columns="budget", values=name)
            top = 1.0 - (i - 0.5) / len(panels)
            fig.add_trace(
                go.Heatmap(
                    z=grid.loc[policies, budgets].to_numpy(),
                    x=[str(b) for b in budgets],
                    y=policies,
                    colorscale=scale,
                    zmin=0.0,
                    zmax=100.0 if name == "token_match" else None,
                    texttemplate=f"%{{z:{fmt}}}",
                    colorbar={"y": top, "len": 0.85 / len(panels)},
                ),
                row=i,
                col=1,
            )
        fig.update_xaxes(title_text="K/V budget", type="category", row=len(panels), col=1)
        fig.update_layout(
            title=title or "Eviction baselines vs KV-Direct", height=240 * len(panels) + 80
        )
        return fig


def summarise(cell: pd.DataFrame, readings: tuple[str, ...]) -> dict[str, object]:
    """Token match and KL of one (policy, budget) from its step rows: means over every step
    (every prompt has the same number), intervals over the prompts' own means."""
    per_prompt = 100.0 * cell.groupby("prompt")["match"].mean()
    _, half = mean_interval(per_prompt.tolist())
    out: dict[str, object] = {
        "token_match": 100.0 * float(cell["match"].mean()),
        "token_match_ci": half,
        "token_match_std": float(per_prompt.std(ddof=0)),
        "token_match_min": float(per_prompt.min()),
        "token_match_max": float(per_prompt.max()),
    }
    for reading in KL_READINGS:
        steps = cell[reading_step_column(reading)]
        measured = reading in readings
        out[column(reading)] = float(steps.mean()) if measured else float("nan")
        out[column(reading, "max")] = float(steps.max()) if measured else float("nan")
        prompts = cell.groupby("prompt")[reading_step_column(reading)].mean().tolist()
        out[column(reading, "mean_ci")] = mean_interval(prompts)[1] if measured else float("nan")
    return out


def reading_step_column(reading: str) -> str:
    """The step table's column of a reading (``kl``, ``free_kl``, ``own_kl``)."""
    return column(reading).replace("mean_", "")
