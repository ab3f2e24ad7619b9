"""What verify's sections share: the row type, the context, the report."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from residkit.generation import Generation

__all__ = ["NEW_TOKENS", "VERIFY_PROMPTS", "Check", "Shared", "VerifyContext", "VerifyReport"]

VERIFY_PROMPTS = (
    "Question: what is 17 + 25? Answer:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
    "fibonacci(n - 2)\n\nprint(fibonacci(10))  # prints",
)
"""The source prompt (capture, Markov, K/V) and the decoding prompt (Markov's target, every
generation); the second is the longer, so the Markov pair keeps the first whole."""

NEW_TOKENS = 24
"""Tokens decoded by the generation checks, all against one full-cache reference."""


@dataclass
class Shared:
    """What several sections use, computed once per verify run.

    Attributes:
        source: The first prompt's tokens.
        target: The second prompt's last ``len(source)`` tokens (the Markov pair, right-aligned),
            or None where the second prompt is the shorter.
        resid: The source's residual before every block and after the last (one capture run).
        logits: The source's logits (from the same run).
        target_logits: The target's logits, or None with ``target``.
        reference: Full-cache greedy decoding of the second prompt, logits kept, EOS ignored.
    """

    source: Tensor
    target: Tensor | None
    resid: Tensor
    logits: Tensor
    target_logits: Tensor | None
    reference: Generation


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

    out_dir: Path | None = None
    prompts: tuple[str, str] = VERIFY_PROMPTS
    figures: bool = True
    made: dict[str, go.Figure] = field(default_factory=dict, repr=False)
    _shared: Shared | None = field(default=None, repr=False)

    @torch.no_grad()
    def shared(self, model: TransformerBridge) -> Shared:
        """The :class:`Shared` runs, made on first use."""
        if self._shared is None:
            from residkit.capture import capture_with_logits
            from residkit.generation import generate

            n = model.cfg.n_layers
            source, second = (model.to_tokens(p) for p in self.prompts)
            resid, logits = capture_with_logits(model, source, list(range(n + 1)))
            k = source.shape[1]
            target = second[:, -k:] if second.shape[1] >= k else None
            self._shared = Shared(
                source=source,
                target=target,
                resid=resid,
                logits=logits,
                target_logits=None if target is None else model(target),
                reference=generate(
                    model,
                    self.prompts[1],
                    max_new_tokens=NEW_TOKENS,
                    return_logits=True,
                    stop_at_eos=False,
                ),
            )
        return self._shared

    def save(self, fig: go.Figure, name: str) -> str | None:
        """Keep ``fig`` for the report under ``name``; with an ``out_dir``, also write it as
        ``name.html`` there (plotly.js beside it, once, never from a CDN) and return the path."""
        if not self.figures:
            return None
        self.made[name] = fig
        if self.out_dir is None:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{name}.html"
        fig.write_html(path, include_plotlyjs="directory")
        return str(path)


@dataclass
class VerifyReport:
    """All checks of one ``verify`` run.

    Examples:
        >>> import residkit
        >>> report = residkit.verify(residkit.load("zoo:llama"), sections=["capture"], figures=False)
        >>> print(report.text().splitlines()[0])
        PASS  capture: captured residuals == run_with_cache (bitwise, all layers)
    """

    model: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    figures: dict[str, list[go.Figure]] = field(default_factory=dict, repr=False)
    """Section -> the figures its checks made (empty with ``figures=False``)."""

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

    def text(self, width: int = 100) -> str:
        """The table as plain text no wider than ``width`` columns (what the CLI prints):
        one line per check with its verdict, the result wrapped and indented below it."""
        lines = []
        for c in self.checks:
            verdict = {True: "PASS", False: "FAIL", None: "info"}[c.passed]
            head = f"{verdict:4}  {c.section}: {c.check}"
            lines.extend(textwrap.wrap(head, width, subsequent_indent="        "))
            lines.extend(
                textwrap.wrap(
                    c.result, width, initial_indent="      ", subsequent_indent="        "
                )
            )
        return "\n".join(lines)

    def write_html(self, path: str | Path, meta: dict[str, str] | None = None) -> Path:
        """One self-contained HTML file: the table, every figure, the model's provenance and
        the versions and date (plotly.js embedded once; opens with no network)."""
        from residkit import report

        sections = [
            report.Section(
                "Summary",
                f"{'All exactness claims hold' if self.passed else 'SOME CLAIMS FAILED'}; "
                f"checks took {self.seconds:.1f} s.",
                self.text_table(),
            )
        ]
        for section in dict.fromkeys(c.section for c in self.checks):
            rows = self.text_table()
            sections.append(
                report.Section(
                    section,
                    "",
                    rows[rows["section"] == section].drop(columns="section"),
                    self.figures.get(section, []),
                )
            )
        return report.write(
            path,
            f"residkit verify: {self.model}",
            sections,
            {**(meta or {}), **report.environment()},
        )

    def text_table(self) -> pd.DataFrame:
        """Section, check, result and PASS / FAIL / info: the table without figure paths."""
        df = self.table[["section", "check", "result", "passed"]].copy()
        df["passed"] = df["passed"].map({True: "PASS", False: "FAIL", None: "info"})
        return df

    def figure(self, *, title: str | None = None) -> go.Figure:
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
        fig.update_layout(title=title or f"residkit verify: {self.model}")
        return fig
