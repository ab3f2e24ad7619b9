"""MkDocs hook: TeX maths (``$...$``, ``$$...$$``) to MathML at build time.

Chromium, Firefox and Safari draw MathML natively, so the site needs no MathJax and loads
nothing from a CDN. Code spans and fenced blocks are left alone.
"""

from __future__ import annotations

import re
from typing import Any

from latex2mathml.converter import convert

_CODE = re.compile(r"(^```.*?^```|^~~~.*?^~~~|`[^`\n]+`)", re.M | re.S)
_DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.S)
_INLINE = re.compile(r"(?<![\\$\w])\$(?!\s)([^$\n]+?)(?<!\s)\$(?![\w$])")


def tex_to_mathml(text: str) -> str:
    """Every ``$...$`` and ``$$...$$`` outside code in ``text`` as MathML.

    Examples:
        >>> tex_to_mathml("a `$x$` and $x^2$")[:20]
        'a `$x$` and <math x'
    """
    parts = _CODE.split(text)
    for i in range(0, len(parts), 2):  # even parts are outside code
        chunk = _DISPLAY.sub(lambda m: convert(m.group(1).strip(), display="block"), parts[i])
        parts[i] = _INLINE.sub(lambda m: convert(m.group(1)), chunk)
    return "".join(parts)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return tex_to_mathml(markdown)
