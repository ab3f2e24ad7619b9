"""The effective-rank explorer: energy slider, model dropdown, rank heatmap, one head's spectrum."""

from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go

from residkit._validate import check_energy
from residkit.spectra import QKSpectra
from residkit.viz.spectra import SIGMA, check_head, rank_heatmap, spectrum
from residkit.widgets._sync import sync as _sync

__all__ = ["RankExplorer", "rank_explorer"]


class RankExplorer(widgets.VBox):
    """Effective-rank explorer: energy slider, model dropdown, heatmap, one head's spectrum.

    Attributes:
        spectra: ``name -> QKSpectra`` the dropdown chooses from.
        slider: Energy ``FloatSlider`` (0..1).
        dropdown: Model ``Dropdown``.
        measure: ``"sigma2"`` / ``"sigma"`` toggle.
        layer_picker: Layer ``Dropdown`` of the selected head.
        head_picker: Query-head ``Dropdown`` of the selected head.
        heatmap: ``FigureWidget`` of :func:`residkit.viz.spectra.rank_heatmap`; clicking a
            cell selects that head.
        spectrum: ``FigureWidget`` of :func:`residkit.viz.spectra.spectrum` for the head.
        status: One line describing the selected head.
    """

    def __init__(self, spectra: dict[str, QKSpectra], *, energy: Any = 0.9) -> None:
        first = next(iter(spectra.values()))
        self.spectra = spectra
        self.slider = widgets.FloatSlider(
            value=check_energy(energy),
            min=0.0,
            max=1.0,
            step=0.01,
            description="energy",
            readout_format=".2f",
            continuous_update=False,
        )
        self.dropdown = widgets.Dropdown(options=list(spectra), description="model")
        self.measure = widgets.ToggleButtons(
            options=[(f"{SIGMA}\u00b2 (energy)", "sigma2"), (SIGMA, "sigma")],
            description="share of",
        )
        self.layer_picker = widgets.Dropdown(
            options=list(range(first.n_layers)), value=0, description="layer"
        )
        self.head_picker = widgets.Dropdown(
            options=list(range(first.n_heads)), value=0, description="head"
        )
        self.heatmap = go.FigureWidget(rank_heatmap(first, self.slider.value))
        self.spectrum = go.FigureWidget(spectrum(first, 0, 0, energy=self.slider.value))
        self.status = widgets.HTML()
        self._updating = False
        self.heatmap.data[0].on_click(self._on_click)
        self.slider.observe(self._refresh_all, names="value")
        self.measure.observe(self._refresh_all, names="value")
        self.dropdown.observe(self._on_model, names="value")
        self.layer_picker.observe(self._refresh_head, names="value")
        self.head_picker.observe(self._refresh_head, names="value")
        controls = widgets.HBox([self.dropdown, self.slider, self.measure])
        picker = widgets.HBox([self.layer_picker, self.head_picker, self.status])
        super().__init__([controls, self.heatmap, picker, self.spectrum])
        self._refresh_status()

    @property
    def current(self) -> QKSpectra:
        """The spectra of the model selected in the dropdown."""
        return self.spectra[self.dropdown.value]

    def select(self, layer: int, head: int) -> None:
        """Show the spectrum of ``(layer, head)`` of the current model."""
        layer, head = check_head(self.current, layer, head)
        self._updating = True
        try:
            self.layer_picker.value = layer
            self.head_picker.value = head
        finally:
            self._updating = False
        self._refresh_head()

    def _on_click(self, trace: Any, points: Any, state: Any) -> None:
        if points.xs and points.ys:
            self.select(int(points.ys[0]), int(points.xs[0]))

    def _on_model(self, change: Any = None) -> None:
        spectra = self.current
        layer = min(self.layer_picker.value, spectra.n_layers - 1)
        head = min(self.head_picker.value, spectra.n_heads - 1)
        self._updating = True
        try:
            # Options first, then values: a new options list may reset the value.
            self.layer_picker.options = list(range(spectra.n_layers))
            self.head_picker.options = list(range(spectra.n_heads))
            self.layer_picker.value = layer
            self.head_picker.value = head
        finally:
            self._updating = False
        self._refresh_all()

    def _refresh_all(self, change: Any = None) -> None:
        _sync(
            self.heatmap,
            rank_heatmap(self.current, self.slider.value, measure=self.measure.value),
        )
        self._refresh_head()

    def _refresh_head(self, change: Any = None) -> None:
        if self._updating:
            return
        fig = spectrum(
            self.current,
            self.layer_picker.value,
            self.head_picker.value,
            energy=self.slider.value,
            measure=self.measure.value,
        )
        _sync(self.spectrum, fig)
        self._refresh_status()

    def _refresh_status(self) -> None:
        spectra, layer, head = self.current, self.layer_picker.value, self.head_picker.value
        rank = int(spectra.ranks(self.slider.value, measure=self.measure.value)[layer, head])
        self.status.value = (
            f"layer {layer}, head {head} (KV head {spectra.kv_heads[head]}): "
            f"<b>rank {rank}</b> of {spectra.d_head} at {self.slider.value:.0%}"
        )


def rank_explorer(spectra: QKSpectra | dict[str, QKSpectra], *, energy: Any = 0.9) -> RankExplorer:
    """An ipywidgets app to explore effective ranks of ``W_Q W_K^T`` across models.

    Move the energy slider and the heatmap recolours in place; pick a model in the dropdown;
    click a heatmap cell (or use the layer/head pickers) to see that head's spectrum.

    Args:
        spectra: One :class:`~residkit.spectra.QKSpectra` (shown under its model name) or
            a dict ``name -> QKSpectra``.
        energy: Initial slider value.

    Returns:
        A :class:`RankExplorer` (an ``ipywidgets.VBox``); display it in a notebook.

    Raises:
        ValueError: an empty dict, a value that is not a QKSpectra, or a bad energy.

    Examples:
        >>> import residkit
        >>> from residkit.spectra import qk_spectra
        >>> app = rank_explorer(qk_spectra(residkit.load("zoo:llama")))
        >>> app.dropdown.options
        ('llama-tiny-s0',)
    """
    table = {spectra.model_name: spectra} if isinstance(spectra, QKSpectra) else dict(spectra)
    if not table:
        raise ValueError("rank_explorer needs at least one QKSpectra; got an empty dict")
    bad = [name for name, s in table.items() if not isinstance(s, QKSpectra)]
    if bad:
        raise ValueError(f"not QKSpectra objects (use residkit.spectra.qk_spectra): {bad}")
    return RankExplorer(table, energy=energy)
