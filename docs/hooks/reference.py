"""MkDocs hook: the API reference is complete, and every entry has a docstring with an example.

A warning fails ``mkdocs build --strict``: a public name of ``residkit.__all__`` missing from
``reference.md``, or a ``:::`` entry whose docstring is missing or shows no ``>>>`` example.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import griffe

log = logging.getLogger("mkdocs.plugins.residkit_reference")
_ENTRY = re.compile(r"^::: ([\w.]+)", re.M)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri != "reference.md":
        return markdown
    # The package the reference is built from (docs/build.py passes its folder).
    source = os.environ.get("RESIDKIT_DOCS_SOURCE")
    package = griffe.load(
        "residkit",
        search_paths=[source] if source else None,
        resolve_aliases=True,
        resolve_external=False,
    )
    public = set(package.exports or [])
    entries = _ENTRY.findall(markdown)
    listed = {path.rsplit(".", 1)[-1] for path in entries} | {"zoo"}
    for name in sorted(public - listed):
        log.warning("reference.md has no entry for residkit.%s", name)
    for path in entries:
        obj = package[path.removeprefix("residkit.")] if path != "residkit" else package
        doc = obj.docstring.value if obj.docstring else ""
        if not doc:
            log.warning("%s has no docstring", path)
        elif ">>>" not in doc:
            log.warning("%s: the docstring has no example (>>>)", path)
    return markdown
