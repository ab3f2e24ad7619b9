"""What verify's sections share: the row type, the context, the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

__all__ = ["VERIFY_PROMPTS", "Check", "VerifyContext", "VerifyReport"]

VERIFY_PROMPTS = (
    "Question: what is 17 + 25? Answer:",
    "def fibonacci(n):\n    if n < 2:",
)


@dataclass
class Check:
    """One row of the verify table.

    Attributes:
        section: Which experiment the check belongs to.
        check: What was checked, in a few words.
        result: The measured value, as text.
        passed: True/False for claims, None for information rows.
        figure: Path of a saved HTML figure, if any.
    """

    section: str
    check: str
    result: str
    passed: bool | None = None
    figure: str | None = None


@dataclass
class VerifyContext:
    """What sections share: the output folder for figures and the prompts."""

    out_dir: Path
    prompts: tuple[str, str] = VERIFY_PROMPTS
    figures: bool = True

    def save(self, fig: go.Figure, name: str) -> str | None:
        """Write ``fig`` as ``name.html`` (plotly.js beside it, once, never from a CDN)."""
        if not self.figures:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{name}.html"
        fig.write_html(path, include_plotlyjs="directory")
        return str(path)


@dataclass
class VerifyReport:
    """All checks of one ``verify`` run."""

    model: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def table(self) -> pd.DataFrame:
        """One row per check: section, check, result, passed, figure ("" where none)."""
        df = pd.DataFrame([c.__dict__ for c in self.checks])
        df["figure"] = [c.figure or "" for c in self.checks]
        df["passed"] = pd.Series([c.passed for c in self.checks], dtype=object)
        return df

    @property
    def passed(self) -> bool:
        """True when no claim failed (information rows do not count)."""
        return all(c.passed is not False for c in self.checks)

    def figure(self) -> go.Figure:
        """The table as a plotly table, claims coloured by outcome."""
        df = self.table
        colours = {True: "#d4edda", False: "#f8d7da", None: "#ffffff"}
        fill = [colours[p] for p in df["passed"]]
        fig = go.Figure(
            go.Table(
                header={"values": ["section", "check", "result", "passed"]},
                cells={
                    "values": [
                        df["section"],
                        df["check"],
                        df["result"],
                        df["passed"].map({True: "PASS", False: "FAIL", None: "info"}),
                    ],
                    "fill_color": [fill] * 4,
                    "align": "left",
                },
            )
        )
        fig.update_layout(title=f"residkit verify: {self.model}")
        return fig
