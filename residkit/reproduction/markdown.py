"""The reproduction as a Markdown page (what ``residkit reproduce --markdown`` writes).

Figures become PNG images drawn from the HTML report by a headless Chromium with the network
blocked (:func:`residkit.report.screenshots`); without playwright the page links the report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from residkit import report
from residkit.reproduction import Reproduction, describe

__all__ = ["render", "rerender", "write_markdown"]


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
    """Write ``result`` as Markdown to ``path``; figure images go in ``<path stem>/``, with the
    results behind the page as ``<path stem>/results.json`` (:func:`render` turns them back into
    the same page, which is how a test checks the page was not edited by hand).

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
    folder = out.parent / out.stem
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(
        json.dumps({"command": command, "note": note, "reproduction": json.loads(result.to_json())},
                   indent=1), encoding="utf-8",
    )  # fmt: skip
    rel = [f.relative_to(out.parent).as_posix() for f in figure_files]
    out.write_text(render(result, command=command, figures=rel, note=note), encoding="utf-8")
    return out


def render(result: Reproduction, *, command: str, figures: list[str], note: str = "") -> str:
    """The page's Markdown text: ``figures`` are the images' paths, in the figures' order."""
    measured = sum(r.seconds for r in result.results)
    lines = [
        "# The paper's claims on real weights",
        "",
        "Every claim of arXiv 2603.19664 (the abstract and Figures 2-5), measured by residkit on",
        f"{', '.join(result.models)}, beside the paper's number and where the paper states it.",
        "Each verdict (*reproduced* or *differs*) is computed from the numbers by the rule in",
        "its row; a *differs* row gives its reason as a measurement from this page or as a",
        "hypothesis marked untested. *Not applicable* rows say why. This page is written by the",
        "command below and not edited by hand.",
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
        at = f" at commit `{claim.commit}`" if claim.commit else ""
        lines += [
            f"## {claim.claim}. The paper: {claim.title}",
            "",
            f"{describe(claim.claim)} Measured in {claim.seconds:.0f} s{at}.",
            "",
            "| model | quantity | paper | source | residkit | verdict | rule | why |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in claim.rows:
            cells = (row.model, row.quantity, row.paper, row.source, row.residkit, row.verdict,
                     row.rule, row.why)  # fmt: skip
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
        for _ in claim.figures:
            if figure_index < len(figures):
                lines += [f"![{claim.claim} figure {figure_index}]({figures[figure_index]})", ""]
            figure_index += 1
    return "\n".join(lines)


def rerender(page: str | os.PathLike[str]) -> str:
    """The Markdown :func:`write_markdown` would write for ``page`` from its ``results.json``."""
    out = Path(page)
    saved = json.loads((out.parent / out.stem / "results.json").read_text(encoding="utf-8"))
    result = Reproduction.from_json(json.dumps(saved["reproduction"]))
    figures = sorted(
        p.relative_to(out.parent).as_posix() for p in (out.parent / out.stem).glob("figure-*.png")
    )
    return render(result, command=saved["command"], figures=figures, note=saved["note"])
