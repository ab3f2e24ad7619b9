"""The documentation site: built strictly (with controls showing a broken link or a missing
docstring fails it), every snippet and exercise solution run, and the built site opened in
Debian's chromium with the network cut."""

from __future__ import annotations

import doctest
import functools
import http.server
import importlib.util
import re
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import griffe
import pytest

import residkit
from tests.lab import CHROMIUM, block_network

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
_spec = importlib.util.spec_from_file_location("docs_build", DOCS / "build.py")
assert _spec is not None and _spec.loader is not None
docs_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs_build)


def _executed(folder: Path) -> Path | None:
    """``folder`` if every notebook there was run this session (it has outputs), else None."""
    names = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    ran = all((folder / n).exists() and '"output_type"' in (folder / n).read_text() for n in names)
    return folder if ran else None


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, executed_notebooks: Path) -> Path:
    out = tmp_path_factory.mktemp("site")
    notebooks = _executed(executed_notebooks)
    done = docs_build.build(out, notebooks)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    if notebooks is not None:
        (out / "notebooks" / ".executed").touch()
    return out


def test_site_builds_strictly(site: Path) -> None:
    assert (site / "index.html").exists() and (site / "reference.html").exists()
    for name in (ROOT / "notebooks").glob("*.ipynb"):
        assert (site / "notebooks" / f"{name.stem}.html").exists()


def test_broken_link_fails_the_build(tmp_path: Path) -> None:
    def edit(docs: Path) -> None:
        page = docs / "concepts" / "eviction.md"
        page.write_text(page.read_text() + "\nSee [this](no-such-page.md).\n")

    done = docs_build.build(tmp_path / "site", edit=edit)
    assert done.returncode != 0 and "no-such-page.md" in done.stdout + done.stderr


def test_entry_without_docstring_fails_the_build(tmp_path: Path) -> None:
    """A reference entry whose object has no docstring (a private helper here) fails it."""

    def edit(docs: Path) -> None:
        page = docs / "reference.md"
        page.write_text(page.read_text() + "\n::: residkit.patching.sweep._keep\n")

    done = docs_build.build(tmp_path / "site", edit=edit)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "residkit.patching.sweep._keep has no docstring" in output


def test_every_public_name_has_a_reference_entry_with_an_example() -> None:
    reference = (DOCS / "reference.md").read_text()
    entries = re.findall(r"^::: ([\w.]+)", reference, re.M)
    package = griffe.load("residkit", resolve_aliases=True, resolve_external=False)
    names = {e.rsplit(".", 1)[-1] for e in entries}
    assert set(residkit.__all__) - {"zoo"} <= names
    for entry in entries:
        obj = package[entry.removeprefix("residkit.")] if entry != "residkit" else package
        assert obj.docstring is not None and ">>>" in obj.docstring.value, entry


def test_attribute_examples_run() -> None:
    """Module attributes' docstrings (ARCH_TABLE) are not collected by --doctest-modules."""
    package = griffe.load("residkit", resolve_aliases=True, resolve_external=False)
    entry = package["architectures.ARCH_TABLE"]
    test = doctest.DocTestParser().get_doctest(
        entry.docstring.value, vars(residkit.architectures).copy(), "ARCH_TABLE", None, 0
    )
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


def _blocks(page: Path, solutions_only: bool) -> list[str]:
    """The ```python blocks of ``page``, in order (inside ``??? success`` blocks only, if asked)."""
    text = page.read_text()
    if solutions_only:
        chunks = re.findall(r'^\?\?\? success "Solution"\n((?:    .*\n|\n)+)', text, re.M)
        text = "\n".join(re.sub(r"^    ", "", c, flags=re.M) for c in chunks)
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


def _run(page: Path, blocks: list[str]) -> None:
    """Run ``blocks`` in order in one fresh module (dataclasses need a real module)."""
    name = f"docs_page_{page.parent.name}_{page.stem}".replace("-", "_")
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        for code in blocks:
            exec(compile(code, str(page), "exec"), vars(module))
    finally:
        del sys.modules[name]


EXERCISES = sorted((DOCS / "exercises").glob("0*.md"))
SNIPPET_PAGES = [
    DOCS / "index.md",
    *sorted((DOCS / "concepts").glob("*.md")),
    *sorted((DOCS / "howto").glob("*.md")),
]


@pytest.mark.parametrize("page", EXERCISES, ids=lambda p: p.stem)
def test_exercise_solutions_run(page: Path, capsys) -> None:
    blocks = _blocks(page, solutions_only=True)
    questions = len(re.findall(r"^\*\*\d+ \(", page.read_text(), re.M))
    assert 3 <= questions <= 5 and len(blocks) == questions, (questions, len(blocks))
    _run(page, blocks)


@pytest.mark.parametrize("page", SNIPPET_PAGES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_page_snippets_run(page: Path) -> None:
    _run(page, _blocks(page, solutions_only=False))


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.mark.browser
def test_site_works_offline_in_chromium(served: str, site: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from tests.test_browser import SHOTS

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        blocked = block_network(page)
        page.goto(f"{served}/index.html")
        page.screenshot(path=str(SHOTS / "docs-home.png"))
        page.goto(f"{served}/concepts/residual-stream.html")
        maths = page.locator("article math")
        assert maths.count() >= 3
        box = maths.first.bounding_box()
        assert box is not None and box["width"] > 5 and box["height"] > 5  # drawn, not raw TeX
        assert "$" not in page.locator("article").inner_text().replace("$ ", "")
        page.screenshot(path=str(SHOTS / "docs-concept-maths.png"), full_page=True)
        page.locator("input.md-search__input").first.click()
        page.keyboard.type("effective rank")
        results = page.locator(".md-search-result__item")
        results.first.wait_for(timeout=20_000)
        assert results.count() > 0
        page.goto(f"{served}/notebooks/01_residual_markov.html")
        page.wait_for_load_state("load")
        plots = page.locator(".js-plotly-plot")
        if (site / "notebooks" / ".executed").exists():  # rendered with their outputs
            assert plots.count() >= 3
        for i in range(plots.count()):
            assert plots.nth(i).locator("svg.main-svg").count() > 0, f"figure {i} blank"
        page.screenshot(path=str(SHOTS / "docs-notebook-01.png"))
        browser.close()
    assert not blocked, f"the site reached for the network: {blocked[:3]}"


def test_maths_hook() -> None:
    """TeX outside code becomes MathML (inline inside a span); code is left alone."""
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        import maths
    finally:
        sys.path.pop(0)
    assert doctest.testmod(maths).failed == 0
    html = maths.tex_to_mathml("is\n$x^2$. And `$y$` and\n\n$$z$$\n")
    assert html.startswith("is\n<span><math") and "`$y$`" in html
    assert '<math xmlns="http://www.w3.org/1998/Math/MathML" display="block">' in html


@pytest.mark.parametrize(
    "name", ["reproduction.md", "qwen/quick/reproduction.md", "qwen/full/reproduction.md"]
)
def test_reproduction_page_is_written_by_the_command_from_its_results(name: str) -> None:
    """A reproduction page is what ``residkit reproduce --markdown`` renders from the results
    saved beside it (so no number on it was typed or edited by hand), from a named commit."""
    import json

    from residkit.reproduction.markdown import rerender

    page = DOCS / name
    text = page.read_text(encoding="utf-8")
    assert text == rerender(page)
    saved = json.loads((page.parent / "reproduction" / "results.json").read_text())
    results = saved["reproduction"]["results"]
    # Each claim ran from a clean tree, at a commit that holds its code.
    assert all(re.fullmatch(r"[0-9a-f]{40}", r["commit"]) for r in results)
    # Control: one number changed on the page is caught.
    first = re.search(r"\d+\.\d+", text)
    assert first is not None
    edited = text[: first.start()] + "9" + text[first.start() + 1 :]
    assert edited != rerender(page)


def test_execute_runs_notebooks_and_names_a_failing_one(tmp_path: Path) -> None:
    import json

    def notebook(*sources: str) -> str:
        cells = [
            {"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {},
             "outputs": [], "source": [s]}
            for i, s in enumerate(sources)
        ]  # fmt: skip
        meta = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}
        return json.dumps({"cells": cells, "metadata": meta, "nbformat": 4, "nbformat_minor": 5})

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    (good / "a.ipynb").write_text(notebook("x = 6 * 7", "print(x)"))
    said: list[str] = []
    out = docs_build.execute(tmp_path / "out", good, timeout=120, say=said.append)
    ran = json.loads((out / "a.ipynb").read_text())["cells"][1]["outputs"]
    assert ran[0]["text"] == ["42\n"] and said[0].startswith("executed a.ipynb in ")
    # Control: an error is named with its notebook, not written as if it ran.
    (bad / "b.ipynb").write_text(notebook("1 / 0"))
    with pytest.raises(RuntimeError, match=r"b\.ipynb failed: (.|\n)*ZeroDivisionError"):
        docs_build.execute(tmp_path / "out2", bad, timeout=120, say=said.append)
    assert not (tmp_path / "out2" / "b.ipynb").exists()
