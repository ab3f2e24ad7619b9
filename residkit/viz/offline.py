"""Notebook figures that draw with no network, in JupyterLab and in any HTML view of a notebook.

plotly's ``notebook`` renderer writes a ``<script>`` loading MathJax from cdnjs into every
figure's HTML, whatever its settings. :func:`offline_figures` registers a renderer that gives
JupyterLab plotly's own mimetype (drawn by the plotly extension bundled with plotly) and, for
every other viewer (nbconvert, the documentation site), HTML with plotly.js inlined in the
first figure only and no MathJax. Nothing changes until it is called.
"""

from __future__ import annotations

from typing import Any

import plotly.io as pio
from plotly.io._base_renderers import MimetypeRenderer

__all__ = ["OfflineHtmlRenderer", "offline_figures"]

RENDERER = "residkit_offline"


class OfflineHtmlRenderer(MimetypeRenderer):
    """``text/html`` for a figure: plotly.js inlined once per kernel, never a CDN, no MathJax."""

    def __init__(self) -> None:
        self.plotlyjs_sent = False

    def to_mimebundle(self, fig_dict: dict[str, Any]) -> dict[str, str]:
        from plotly.io import to_html

        html = to_html(
            fig_dict,
            include_plotlyjs=not self.plotlyjs_sent,
            include_mathjax=False,
            full_html=False,
            default_width="100%",
            default_height=525,
            validate=False,
        )
        self.plotlyjs_sent = True
        return {"text/html": html}


def offline_figures() -> str:
    """Make figures in this kernel draw offline; returns the renderer string set as default.

    Examples:
        >>> import plotly.io as pio
        >>> before = pio.renderers.default
        >>> offline_figures()
        'plotly_mimetype+residkit_offline'
        >>> pio.renderers.default = before
    """
    if RENDERER not in pio.renderers:
        pio.renderers[RENDERER] = OfflineHtmlRenderer()
    pio.renderers.default = f"plotly_mimetype+{RENDERER}"
    return pio.renderers.default
