"""The reproduction as a Markdown page (what ``residkit reproduce --markdown`` writes).

Figures become PNG images drawn from the HTML report by a headless Chromium with the network
blocked (:func:`residkit.report.screenshots`); without playwright the page links the report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from residkit import report
from residkit.reproduction import describe

if TYPE_CHECKING:
    from residkit.reproduction import Reproduction

__all__ = ["write_markdown"]


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_markdown(
    result: Reproduction,
    path: str | os.PathLike[str],
    *,
    command: str,
    report_path: str | os.PathLike[str] | None = None,
    images: bool = True,
) -> Path:
    """Write ``result`` as Markdown to ``path``; figure images go in ``<path stem>/``.

    Args:
        result: A finished reproduction.
        path: The Markdown file.
        command: The command line that produced ``result`` (printed on the page).
        report_path: The HTML report to draw the images from (written beside ``path``
            when None).
        images: Draw PNG images of the figures (needs playwright and Chromium).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    html = Path(report_path) if report_path is not None else out.with_suffix(".html")
    if report_path is None:
        result.write_report(html)
    figure_files: list[Path] = []
    note = ""
    if images:
        try:
            figure_files = report.screenshots(html, out.parent / out.stem)
        except RuntimeError as err:
            note = f"(figures not drawn: {err}; open the HTML report instead)"
    measured = sum(r.seconds for r in result.results)
    lines = [
        "# The paper's claims on real weights",
        "",
        "Every claim of arXiv 2603.19664 (the abstract and Figures 2-5), measured by residkit on",
        f"{', '.join(result.models)}, beside the paper's number. Verdicts: *reproduced*,",
        "*differs* (with the reason in one sentence) or *not applicable*.",
        "",
        "Reproduce it (the figures below are images of the interactive HTML report):",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Measured in {measured / 60:.1f} min of claim time on this machine. {note}".rstrip(),
        "",
        "| | |",
        "|---|---|",
        *(f"| {_cell(k)} | {_cell(v)} |" for k, v in result.meta.items()),
        "",
    ]
    counts = result.table["verdict"].value_counts().to_dict()
    lines += [
        "## Summary",
        "",
        ", ".join(f"{n} {verdict}" for verdict, n in counts.items())
        + f" over {len(result.table)} comparisons.",
        "",
    ]
    figure_index = 0
    for claim in result.results:
        lines += [
            f"## {claim.claim}: {claim.title}",
            "",
            f"{describe(claim.claim)} Measured in {claim.seconds:.0f} s.",
            "",
            "| model | quantity | paper | residkit | verdict | why |",
            "|---|---|---|---|---|---|",
        ]
        for row in claim.rows:
            cells = (row.model, row.quantity, row.paper, row.residkit, row.verdict, row.why)
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
        for _ in claim.figures:
            if figure_index < len(figure_files):
                rel = figure_files[figure_index].relative_to(out.parent)
                lines += [f"![{claim.claim} figure {figure_index}]({rel.as_posix()})", ""]
            figure_index += 1
    out.write_text("\n".join(lines), encoding="utf-8")
    return out
