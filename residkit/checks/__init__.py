"""``residkit verify``: every check residkit has, on one model, as one table.

Each section is a module of this package with a function ``run(model, ctx) -> list[Check]``;
:data:`SECTIONS` lists them in order. The experiment modules know nothing of verify: a
section calls their public functions and turns the results into rows. The CLI runs every
section and exits non-zero when an exactness claim fails.

Examples:
    >>> import residkit
    >>> model = residkit.load("zoo:llama")
    >>> report = residkit.verify(model, sections=["capture"], figures=False)
    >>> report.passed, len(report.table)
    (True, 3)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from transformer_lens.model_bridge import TransformerBridge

from residkit._entry import entry
from residkit.checks import baselines, capture, kv, kvdirect, load, markov, spectra
from residkit.checks.base import VERIFY_PROMPTS, Check, VerifyContext, VerifyReport

__all__ = ["SECTIONS", "VERIFY_PROMPTS", "Check", "VerifyContext", "VerifyReport", "verify"]

_RUN: dict[str, Callable[[TransformerBridge, VerifyContext], list[Check]]] = {
    "load": load.run,
    "capture": capture.run,
    "markov": markov.run,
    "kv": kv.run,
    "qk_spectra": spectra.run,
    "kvdirect": kvdirect.run,
    "baselines": baselines.run,
}

SECTIONS: tuple[str, ...] = tuple(_RUN)
"""Section names, in the order ``verify`` runs them (modules of this package)."""


@entry
def verify(
    model: TransformerBridge,
    *,
    name: str = "model",
    out_dir: str | Path | None = None,
    sections: list[str] | None = None,
    figures: bool = True,
    progress: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Run every check residkit has on ``model``.

    Args:
        model: A bridge from :func:`residkit.load`.
        name: Label for the report.
        out_dir: Folder to write each figure to as HTML; default none (the figures stay in
            ``report.figures``, and :meth:`VerifyReport.write_html` embeds them).
        sections: Subset of :data:`SECTIONS` to run (default: all).
        figures: Make figures (off where only the numbers are needed).
        progress: Called with each section's name before it runs.

    Returns:
        A :class:`VerifyReport`; ``.passed`` is False if any exactness claim failed.

    Raises:
        ValueError: an unknown section name (the message lists the known ones).

    Examples:
        >>> import residkit
        >>> report = residkit.verify(residkit.load("zoo:llama"), sections=["markov"], figures=False)
        >>> report.passed, report.table["section"].unique().tolist()
        (True, ['markov'])
    """
    if sections is not None:
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown verify section(s) {unknown}; known: {', '.join(SECTIONS)}")
    ctx = VerifyContext(out_dir=None if out_dir is None else Path(out_dir), figures=figures)
    report = VerifyReport(model=name)
    start = time.perf_counter()
    for section in SECTIONS:
        if sections is not None and section not in sections:
            continue
        if progress is not None:
            progress(section)
        made = len(ctx.made)
        report.checks.extend(_RUN[section](model, ctx))
        new = list(ctx.made.values())[made:]
        if new:
            report.figures[section] = new
    report.seconds = time.perf_counter() - start
    return report
