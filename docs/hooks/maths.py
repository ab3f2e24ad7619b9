"""MkDocs hook: TeX maths (``$...$``, ``$$...$$``) to MathML at build time.

Chromium, Firefox and Safari draw MathML natively, so the site needs no MathJax and loads
nothing from a CDN. Code spans and fenced blocks are left alone.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from latex2mathml.converter import convert

log = logging.getLogger("mkdocs.plugins.residkit_maths")

_CODE = re.compile(r"(^```.*?^```|^~~~.*?^~~~|`[^`\n]+`)", re.M | re.S)
_DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.S)
_INLINE = re.compile(r"(?<![\\$\w])\$(?!\s)([^$\n]+?)(?<!\s)\$(?![\w$])")


def tex_to_mathml(text: str) -> str:
    """Every ``$...$`` and ``$$...$$`` outside code in ``text`` as MathML.

    Examples:
        >>> tex_to_mathml("a `$x$` and $x^2$")[:25]
        'a `$x$` and <span><math x'
    """
    parts = _CODE.split(text)
    for i in range(0, len(parts), 2):  # even parts are outside code
        chunk = _DISPLAY.sub(lambda m: convert(m.group(1).strip(), display="block"), parts[i])
        # Inside a span: a line that starts with <math> would be read as a raw HTML block.
        parts[i] = _INLINE.sub(lambda m: f"<span>{convert(m.group(1))}</span>", chunk)
    return "".join(parts)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    # Notebook pages arrive as HTML with their outputs (where "$" is just a character); their
    # markdown cells were converted when docs/build.py copied them.
    if page.file.src_uri.endswith(".ipynb"):
        return markdown
    try:
        return tex_to_mathml(markdown)
    except Exception as err:  # latex2mathml raises its own error types for bad TeX
        log.warning("%s: TeX that latex2mathml cannot convert (%r)", page.file.src_uri, err)
        return markdown
