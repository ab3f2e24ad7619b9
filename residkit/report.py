"""Self-contained HTML reports: one file, plotly.js embedded once, opens with no network.

Used by ``residkit verify --report`` and ``residkit reproduce --report``. Nothing in a report
loads from a CDN: plotly.js is inlined, there is no MathJax and no web font.

Examples:
    >>> import plotly.graph_objects as go, pandas as pd
    >>> section = Section("A", "text", pd.DataFrame({"x": [1]}), [go.Figure(go.Bar(y=[1]))])
    >>> html = render("Title", [section], {"date": "today"})
    >>> 'src="http' in html, html.count("<table"), html.count('class="plotly-graph-div"')
    (False, 2, 1)
"""

from __future__ import annotations

import html
import os
import platform
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

__all__ = ["Section", "chromium_path", "environment", "render", "screenshots", "write"]

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1200px; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2.2rem;
     border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .85rem; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.pass { background: #d4edda; } td.fail { background: #f8d7da; } td.differs { background: #fff3cd; }
.meta td:first-child { font-weight: 600; }
p.note { color: #555; }
"""


@dataclass
class Section:
    """One part of a report: a heading, a paragraph, an optional table and figures."""

    heading: str
    text: str = ""
    table: pd.DataFrame | None = None
    figures: list[go.Figure] = field(default_factory=list)


def environment() -> dict[str, str]:
    """Date, machine and the versions that decide the numbers."""

    def v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
        "python": platform.python_version(),
        **{d: v(d) for d in ("residkit", "torch", "transformers", "transformer-lens", "gguf")},
        "residkit commit": commit(),
    }


def commit() -> str:
    """The git commit residkit runs from (``+ uncommitted changes`` when the tree differs), or
    ``"not a git checkout"`` (an installed wheel)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return "not a git checkout"
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "residkit"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "git not available"
    return head + (" + uncommitted changes" if dirty else "")


def _cell_class(value: object) -> str:
    text = str(value).lower()
    if text in ("pass", "true", "reproduced"):
        return "pass"
    if text in ("fail", "false"):
        return "fail"
    return "differs" if text == "differs" else ""


def _table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for record in df.itertuples(index=False):
        cells = []
        for value in record:
            shown = "" if value is None or (isinstance(value, float) and value != value) else value
            css = _cell_class(shown)
            cells.append(f'<td class="{css}">{html.escape(str(shown))}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render(title: str, sections: list[Section], meta: dict[str, str]) -> str:
    """The report as one HTML string (plotly.js inlined once)."""
    from plotly.offline import get_plotlyjs

    meta_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items()
    )
    body = [f"<h1>{html.escape(title)}</h1>", f'<table class="meta">{meta_rows}</table>']
    for section in sections:
        body.append(f"<h2>{html.escape(section.heading)}</h2>")
        if section.text:
            body.append(f'<p class="note">{html.escape(section.text)}</p>')
        if section.table is not None and len(section.table):
            body.append(_table(section.table))
        for fig in section.figures:
            body.append(
                fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})
            )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"<script>{get_plotlyjs()}</script></head><body>{''.join(body)}</body></html>"
    )


def write(
    path: str | os.PathLike[str], title: str, sections: list[Section], meta: dict[str, str]
) -> Path:
    """Write :func:`render`'s HTML to ``path`` (folders created); return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(title, sections, meta), encoding="utf-8")
    return out


def chromium_path() -> str | None:
    """A Chromium for headless screenshots: ``$RESIDKIT_CHROMIUM``, Debian's, or playwright's."""
    candidate = os.environ.get("RESIDKIT_CHROMIUM") or "/usr/bin/chromium"
    return candidate if Path(candidate).exists() else None


def screenshots(report: str | os.PathLike[str], folder: str | os.PathLike[str]) -> list[Path]:
    """PNG images of every figure of a report written by :func:`write`, drawn by a headless
    Chromium with the network blocked (so an image also proves the report works offline).

    Raises:
        RuntimeError: playwright is not installed, or a figure failed to draw.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:  # an optional dependency of the docs tooling only
        raise RuntimeError("figure images need playwright: pip install playwright") from err
    out_dir = Path(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path())
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.route("http*://**", lambda route: route.abort())
        page.goto(Path(report).resolve().as_uri())
        page.wait_for_load_state("load")
        divs = page.locator(".plotly-graph-div")
        for i in range(divs.count()):
            div = divs.nth(i)
            if div.locator("svg.main-svg").count() == 0:
                browser.close()
                raise RuntimeError(f"figure {i} of {report} did not draw")
            path = out_dir / f"figure-{i:02d}.png"
            div.screenshot(path=str(path))
            paths.append(path)
        browser.close()
    return paths
