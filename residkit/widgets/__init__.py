"""Interactive Jupyter apps (ipywidgets 8 + plotly ``FigureWidget``).

- :func:`rank_explorer`: effective ranks of ``W_Q W_K^T`` per head, with an energy slider.
- :func:`patching_explorer`: activation patching per layer and position, with the top-k next
  tokens of any patched run.

plotly's ``FigureWidget`` is an ``anywidget`` widget since plotly 6, so ``anywidget`` must
be installed for these apps (JupyterLab 4 needs no extension beyond that).
"""

from residkit.widgets.patching import PatchingExplorer, patching_explorer
from residkit.widgets.rank import RankExplorer, rank_explorer

__all__ = ["PatchingExplorer", "RankExplorer", "patching_explorer", "rank_explorer"]
