"""What verify's sections share: the row type, the context, the report."""

from __future__ import annotations

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

    out_dir: Path
    prompts: tuple[str, str] = VERIFY_PROMPTS
    figures: bool = True
    _shared: Shared | None = field(default=None, repr=False)

    @torch.no_grad()
    def shared(self, model: TransformerBridge) -> Shared:
        """The :class:`Shared` runs, made on first use."""
        if self._shared is None:
            from residkit.generation import generate
            from residkit.markov import capture_with_logits

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
