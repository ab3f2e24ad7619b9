"""Build the documentation site: ``python docs/build.py [--execute | --notebooks DIR] [--site DIR]``.

The site is made in a temporary copy of ``docs/``, so building changes no tracked file:

- the notebooks are added under ``notebooks/``: the executed copies in ``--notebooks`` when
  given (the test suite passes the ones it ran in JupyterLab); with ``--execute``, the
  committed ones run first in a temporary folder (nbclient, one kernel per notebook; minutes
  on 2 cores, since they load the real models); else the committed ones, which have no
  outputs. Their TeX maths becomes MathML, as on every other page;
- ``benchmarks/RESULTS.md`` is added as ``results/benchmarks.md``;
- ``mkdocs build --strict`` runs on a copy of ``mkdocs.yml`` pointing at that folder, so a
  broken link, a missing docstring reference or a bad cross-reference fails the build.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs" / "hooks"))

from maths import tex_to_mathml  # noqa: E402


def prepare(notebooks: Path | None, work: Path, source: Path = ROOT) -> Path:
    """A complete docs folder in ``work``; returns the mkdocs.yml to build. ``source`` is the
    folder holding the ``residkit`` package the API reference is read from."""
    docs = work / "docs"
    shutil.copytree(ROOT / "docs", docs, ignore=shutil.ignore_patterns("build.py", "__pycache__"))
    (docs / "notebooks").mkdir()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        source = notebooks / path.name if notebooks and (notebooks / path.name).exists() else path
        nb = json.loads(source.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "markdown":
                cell["source"] = tex_to_mathml("".join(cell["source"]))
        (docs / "notebooks" / path.name).write_text(json.dumps(nb))
    (docs / "results").mkdir(exist_ok=True)
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", docs / "results" / "benchmarks.md")
    config = (ROOT / "mkdocs.yml").read_text()
    config = config.replace("docs_dir: docs", f"docs_dir: {docs}")
    config = config.replace("paths: [.]", f"paths: [{source}]")
    for hook in ("maths", "reference"):
        config = config.replace(f"- docs/hooks/{hook}.py", f"- {docs / 'hooks' / hook}.py")
    target = work / "mkdocs.yml"
    target.write_text(config)
    return target


def execute(
    out: Path,
    source: Path = ROOT / "notebooks",
    timeout: int = 1800,
    say: Callable[[str], None] = print,
) -> Path:
    """Run every notebook in ``source`` with nbclient and write the executed copies to ``out``.

    Raises:
        RuntimeError: a notebook failed, naming it and the cell's error.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.ipynb")):
        start = time.monotonic()
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(
            nb, timeout=timeout, kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        )  # fmt: skip
        try:
            client.execute()
        except CellExecutionError as err:
            raise RuntimeError(f"{path.name} failed: {str(err).strip()[-1500:]}") from None
        nbformat.write(nb, out / path.name)
        say(f"executed {path.name} in {time.monotonic() - start:.0f} s")
    return out


def build(
    site: Path,
    notebooks: Path | None = None,
    *,
    source: Path = ROOT,
    edit: Callable[[Path], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``mkdocs build --strict`` into ``site``; the completed process (its output has the
    warnings). ``edit(docs_folder)`` may change the prepared pages first (the tests' controls)."""
    with tempfile.TemporaryDirectory(prefix="residkit-docs-") as tmp:
        config = prepare(notebooks, Path(tmp), source)
        if edit is not None:
            edit(Path(tmp) / "docs")
        argv = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config)]
        env = {**os.environ, "RESIDKIT_DOCS_SOURCE": str(source), "NO_MKDOCS_2_WARNING": "1"}
        # nbconvert finds its templates under <prefix>/share/jupyter; in a virtualenv layered
        # over another Python's packages they sit under the base prefix.
        shares = [str(Path(p) / "share" / "jupyter") for p in (sys.prefix, sys.base_prefix)]
        env["JUPYTER_PATH"] = os.pathsep.join(
            [*filter(None, [os.environ.get("JUPYTER_PATH")]), *dict.fromkeys(shares)]
        )
        return subprocess.run([*argv, "-d", str(site)], capture_output=True, text=True, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--notebooks", type=Path, help="executed notebooks to render")
    which.add_argument(
        "--execute", action="store_true", help="run the notebooks first, so pages have outputs"
    )
    parser.add_argument("--site", type=Path, default=ROOT / "site")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="residkit-executed-") as tmp:
        try:
            notebooks = execute(Path(tmp)) if args.execute else args.notebooks
        except RuntimeError as err:
            print(f"docs/build.py: {err}", file=sys.stderr)
            return 1
        done = build(args.site.resolve(), notebooks)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    if done.returncode == 0:
        print(f"site: {args.site / 'index.html'}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
