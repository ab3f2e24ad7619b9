"""What people look at, in a real browser: every notebook run in JupyterLab, the two explorer
widgets driven by hand, and the verify report, all in Debian's chromium with the network cut.

Screenshots go to ``$RESIDKIT_ARTIFACTS/browser`` (``.ci/run`` sets it to ``ci-artifacts``;
default: a temporary folder, printed). Skipped, with the reason, only where chromium or
playwright is missing (``.ci/run`` installs chromium with apt).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import CHROMIUM, Lab, block_network, copy_notebooks, run_notebook

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
ARTIFACTS = Path(os.environ.get("RESIDKIT_ARTIFACTS") or tempfile.mkdtemp(prefix="residkit-"))
SHOTS = ARTIFACTS / "browser"

pytestmark = pytest.mark.browser

if not Path(CHROMIUM).exists():
    pytest.skip(
        f"no {CHROMIUM}: install Debian's chromium (apt-get install chromium)",
        allow_module_level=True,
    )
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

CDN_NOTEBOOK = {
    "cells": [
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "cdn",
            "metadata": {},
            "outputs": [],
            "source": [
                "import plotly.graph_objects as go\n",
                "import plotly.io as pio\n",
                'pio.renderers.default = "notebook_connected"\n',
                "go.Figure(go.Bar(y=[1, 3, 2]))",
            ],
        }
    ],
    "metadata": {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}
    },
    "nbformat": 4,
    "nbformat_minor": 5,
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, executed_notebooks: Path) -> Iterator[Lab]:
    root = executed_notebooks  # Lab saves each notebook there after running it
    copy_notebooks(NOTEBOOKS, root)
    (root / "cdn_control.ipynb").write_text(json.dumps(CDN_NOTEBOOK))
    SHOTS.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser screenshots: {SHOTS}")
    with Lab(root, tmp_path_factory.mktemp("lab-settings")) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(lab: Lab, browser) -> Iterator[object]:
    """A fresh page per test, and no kernel left running after it, whatever happened: one
    notebook's timeout or failure never reaches the next."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    block_network(page)
    try:
        yield page
    finally:
        page.close()
        lab.shutdown_kernels()


def _poll(read, before, timeout_s: float = 60.0):
    """``read()`` once it differs from ``before`` (or the last value after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while value == before and time.monotonic() < deadline:
        time.sleep(0.5)
        value = read()
    return value


def _z(plot) -> str:
    return plot.evaluate("el => JSON.stringify(el.data[0].z)")


def _title(plot) -> str:
    return plot.evaluate("el => (el.layout.title && el.layout.title.text) || ''")


def _drive_rank_explorer(panel) -> None:
    # Locators in has= are relative to the candidate, so they start from the page.
    app = panel.locator(".widget-vbox").filter(has=panel.page.locator(".widget-slider")).last
    heatmap, spectrum = app.locator(".js-plotly-plot").nth(0), app.locator(".js-plotly-plot").nth(1)
    z0, title0 = _z(heatmap), _title(spectrum)
    readout = app.locator(".widget-slider .widget-readout").first
    readout.click()
    panel.page.keyboard.press("Control+a")
    panel.page.keyboard.type("0.5")
    panel.page.keyboard.press("Enter")
    assert _poll(lambda: _z(heatmap), z0) != z0, "the energy slider did not change the heatmap"
    layer = app.get_by_label("layer", exact=True)
    current = layer.input_value()
    options = layer.locator("option").all_inner_texts()
    layer.select_option(label=next(o for o in options if o != current))
    assert _poll(lambda: _title(spectrum), title0) != title0, "picking a layer kept the spectrum"
    app.screenshot(path=str(SHOTS / "03_rank_explorer.png"))


def _drive_patching_explorer(panel) -> None:
    hook_box = panel.page.locator(".widget-dropdown").filter(has_text="hook")
    app = panel.locator(".widget-vbox").filter(has=hook_box).last
    hook = app.get_by_label("hook", exact=True)
    heatmap = app.locator(".js-plotly-plot").first
    status = app.locator(".widget-html").first
    z0, status0 = _z(heatmap), status.inner_text()
    hook.select_option(label="attn_out")
    assert _poll(lambda: _z(heatmap), z0, 120) != z0, "the hook dropdown did not change the heatmap"
    status1 = _poll(status.inner_text, status0)
    # Cells run after the explorer scroll it away; a click at raw coordinates needs it in view.
    heatmap.scroll_into_view_if_needed()
    box = heatmap.locator(".nsewdrag").first.bounding_box()
    assert box is not None
    heatmap.page.mouse.click(box["x"] + box["width"] * 0.15, box["y"] + box["height"] * 0.35)
    status2 = _poll(status.inner_text, status1)
    assert status2 != status1, "clicking a cell did not select its patched run"
    assert app.locator("table.residkit-topk tbody tr").count() >= 3
    app.screenshot(path=str(SHOTS / "01_patching_explorer.png"))
    z_exact = _z(heatmap)
    app.locator(".widget-toggle-button", has_text="error").click()
    assert _poll(lambda: _z(heatmap), z_exact, 120) != z_exact, (
        "the error view kept the exact heatmap"
    )
    assert "spearman" in _title(heatmap)
    app.screenshot(path=str(SHOTS / "01_patching_explorer_error.png"))


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_in_jupyterlab(name: str, lab: Lab, page) -> None:
    run = run_notebook(page, lab, name)
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    panel.screenshot(path=str(SHOTS / f"{name}.png"))
    assert not run.errors, run.errors[0]
    assert run.unrun == 0, f"{run.unrun} cells did not run"
    assert run.figures > 0 and not run.undrawn, f"figures {run.undrawn} of {run.figures} blank"
    assert not [c for c in run.console if "Plotly is not defined" in c]
    text = (NOTEBOOKS / name).read_text()
    if "$" in text:
        assert run.maths > 0 and not run.raw_dollars, f"maths not rendered: {run.raw_dollars[:1]}"
    if name.startswith("01_"):
        _drive_patching_explorer(panel)
    if name.startswith("03_"):
        _drive_rank_explorer(panel)


def _notebook(*sources: str) -> dict:
    cells = [
        {"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {},
         "outputs": [], "source": [src]}
        for i, src in enumerate(sources)
    ]  # fmt: skip
    return {**CDN_NOTEBOOK, "cells": cells}


def test_a_timeout_names_the_running_cell_and_the_next_notebook_still_runs(lab: Lab, browser):
    (lab.root / "hang.ipynb").write_text(
        json.dumps(_notebook("x = 1", "import time\ntime.sleep(900)", "y = 2"))
    )
    (lab.root / "after.ipynb").write_text(json.dumps(_notebook("a = 1", "b = a + 1\nb")))
    first = browser.new_page()
    try:
        with pytest.raises(
            TimeoutError, match=r"code cell 1 was running \('import time'\), 1 more had not"
        ):
            run_notebook(first, lab, "hang.ipynb", timeout_s=15)
    finally:
        first.close()
        assert lab.shutdown_kernels() >= 1  # the hanging kernel is ended
    second = browser.new_page()
    try:
        run = run_notebook(second, lab, "after.ipynb", timeout_s=120)
    finally:
        second.close()
        lab.shutdown_kernels()
    assert run.unrun == 0 and not run.errors


def test_cdn_renderer_is_caught(lab: Lab, page) -> None:
    """Negative control: a figure that fetches plotly.js from a CDN stays blank here."""
    run = run_notebook(page, lab, "cdn_control.ipynb")
    blank = run.figures == 0 or run.undrawn
    assert blank, "a CDN-bound figure drew with the network cut: the checks above prove nothing"


def test_verify_report_draws_offline(tmp_path: Path, page) -> None:
    import residkit

    model = residkit.load("smollm2-135m-instruct")
    result = residkit.verify(model, name="smollm2-135m-instruct", sections=["capture", "markov"])
    path = result.write_html(tmp_path / "verify.html", {"model": "smollm2-135m-instruct"})
    assert 'src="http' not in path.read_text()  # plotly.js names cdn.plot.ly in a default only
    report = page.context.browser.new_page(viewport={"width": 1200, "height": 900})
    block_network(report)
    report.goto(path.as_uri())
    report.wait_for_load_state("load")
    divs = report.locator(".plotly-graph-div")
    expected = sum(len(f) for f in result.figures.values())
    assert divs.count() == expected >= 2
    for i in range(expected):
        assert divs.nth(i).locator("svg.main-svg").count() > 0, f"figure {i} did not draw"
        assert divs.nth(i).evaluate("el => el.data.length") > 0
    assert report.locator("table").count() >= 3  # meta, summary, a table per section
    report.screenshot(path=str(SHOTS / "verify-report.png"), full_page=True)
    report.close()
