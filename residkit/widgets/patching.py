"""The patching explorer: a layer x position heatmap of activation patching, one patched run's
top next tokens on click."""

from __future__ import annotations

import dataclasses
import html
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go
import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit.capture import Inputs, to_tokens
from residkit.patching import (
    PatchingSweep,
    attribution_sweep,
    compare_sweeps,
    patched_logits,
    patching_sweep,
)
from residkit.widgets._sync import sync

__all__ = ["EXPLORER_HOOKS", "METRICS", "VIEWS", "PatchingExplorer", "patching_explorer"]

EXPLORER_HOOKS = ("resid_pre", "attn_out", "mlp_out")
"""The hook points the explorer's dropdown offers."""

METRICS = {
    "logit_diff": "logit difference (answer - wrong)",
    "kl": "KL(clean || patched), last position",
}
"""Metric key -> label in the metric dropdown."""

VIEWS = ("exact", "estimate", "error")
"""What the heatmap shows: the exact sweep, the attribution-patching estimate
(:func:`~residkit.patching.attribution_sweep`), or the estimate's error (estimate - exact)."""


class PatchingExplorer(widgets.VBox):
    """Activation patching as an app: hook and metric dropdowns, heatmap, top-k table.

    Sweeps run once per (hook, metric) and are kept, so switching back is instant.

    Attributes:
        model: The bridge the sweeps run on.
        clean, corrupted: The two prompts' tokens ``[1, pos]``.
        answer, wrong: Token ids whose logit difference is the first metric.
        hook_picker: ``Dropdown`` of :data:`EXPLORER_HOOKS`.
        metric_picker: ``Dropdown`` of :data:`METRICS`.
        view_picker: ``ToggleButtons`` of :data:`VIEWS`.
        heatmap: ``FigureWidget`` of the current :class:`~residkit.patching.PatchingSweep`;
            clicking a cell selects that (layer, position).
        table: ``HTML``: the top-k next tokens of the selected patched run, beside the clean
            and corrupted runs'.
        sweeps: ``(hook, metric) -> PatchingSweep`` computed so far.
        estimates: ``(hook, metric) -> PatchingSweep`` attribution estimates computed so far.
    """

    def __init__(
        self,
        model: TransformerBridge,
        clean: Tensor,
        corrupted: Tensor,
        *,
        answer: int,
        wrong: int,
        top_k: int = 8,
        batch_size: int | None = None,
    ) -> None:
        self.model, self.clean, self.corrupted = model, clean, corrupted
        self.answer, self.wrong, self.top_k, self.batch_size = answer, wrong, top_k, batch_size
        with torch.no_grad():
            self._clean_logits = model(clean)
            self._corrupt_logits = model(corrupted)
        self._clean_logp = torch.log_softmax(self._clean_logits[0, -1].double(), dim=-1)
        self.sweeps: dict[tuple[str, str], PatchingSweep] = {}
        self.estimates: dict[tuple[str, str], PatchingSweep] = {}
        self.view_picker = widgets.ToggleButtons(options=list(VIEWS), description="show")
        self.hook_picker = widgets.Dropdown(options=list(EXPLORER_HOOKS), description="hook")
        self.metric_picker = widgets.Dropdown(
            options=[(label, key) for key, label in METRICS.items()], description="metric"
        )
        self.heatmap = go.FigureWidget(self._figure())
        self.table = widgets.HTML()
        self.status = widgets.HTML()
        self.heatmap.data[0].on_click(self._on_click)
        self.hook_picker.observe(self._refresh, names="value")
        self.metric_picker.observe(self._refresh, names="value")
        self.view_picker.observe(self._refresh, names="value")
        controls = widgets.HBox([self.hook_picker, self.metric_picker, self.view_picker])
        super().__init__([controls, self.heatmap, self.status, self.table])
        self.select(model.cfg.n_layers - 1, clean.shape[1] - 1)

    @property
    def sweep(self) -> PatchingSweep:
        """The sweep of the selected hook and metric (run on first use)."""
        key = (self.hook_picker.value, self.metric_picker.value)
        if key not in self.sweeps:
            metric = self._logit_diff if key[1] == "logit_diff" else self._kl
            self.sweeps[key] = patching_sweep(
                self.model,
                self.clean,
                self.corrupted,
                metric,
                hook=key[0],
                batch_size=self.batch_size,
                progress=False,
            )
        return self.sweeps[key]

    @property
    def estimate(self) -> PatchingSweep:
        """The attribution-patching estimate of :attr:`sweep` (run on first use)."""
        key = (self.hook_picker.value, self.metric_picker.value)
        if key not in self.estimates:
            metric = self._logit_diff if key[1] == "logit_diff" else self._kl
            self.estimates[key] = attribution_sweep(
                self.model, self.clean, self.corrupted, metric, hook=key[0]
            )
        return self.estimates[key]

    def select(self, layer: int, pos: int) -> None:
        """Show the top-k next tokens of the run patched at ``(layer, pos)``."""
        hook = self.hook_picker.value
        logits = patched_logits(
            self.model, self.clean, self.corrupted, hook=hook, layer=layer, pos=pos
        )
        value = float(self.sweep.values[layer, pos])
        token = self.sweep.str_tokens[pos]
        estimated = ""
        if self.view_picker.value != "exact":
            guess = float(self.estimate.values[layer, pos])
            estimated = f"; estimate {guess:.3f} (error {guess - value:+.3f})"
        self.status.value = (
            f"<b>{hook}</b> patched at layer {layer}, position {pos} ({html.escape(repr(token))}): "
            f"{METRICS[self.metric_picker.value]} = <b>{value:.3f}</b>{estimated}"
        )
        columns = [
            ("clean", self._clean_logits),
            ("patched", logits),
            ("corrupted", self._corrupt_logits),
        ]
        self.table.value = self._top_k_html(columns)

    def _logit_diff(self, logits: Tensor) -> Tensor:
        return logits[0, -1, self.answer] - logits[0, -1, self.wrong]

    def _kl(self, logits: Tensor) -> Tensor:
        log_q = torch.log_softmax(logits[0, -1].double(), dim=-1)
        p = self._clean_logp.exp()
        return (p * (self._clean_logp - log_q)).sum()

    def _figure(self) -> go.Figure:
        sweep, view = self.sweep, self.view_picker.value
        answer, wrong = (self.model.to_string([t]) for t in (self.answer, self.wrong))
        label = (
            f"logit[{answer!r}] - logit[{wrong!r}]"
            if self.metric_picker.value == "logit_diff"
            else "KL(clean || patched)"
        )
        if view == "exact":
            return sweep.figure(title=f"patching {sweep.hook}: {label} (click a cell)")
        est = self.estimate
        if view == "estimate":
            return est.figure(title=f"attribution estimate, {sweep.hook}: {label} (click a cell)")
        s = compare_sweeps(sweep, est).summary
        top = next(k for k in s if k.startswith("top_"))
        error = dataclasses.replace(sweep, values=est.values - sweep.values, method="error")
        return error.figure(
            title=f"estimate - exact, {sweep.hook}: {label} (spearman {s['spearman']:.2f}, "
            f"{top.replace('_', '-')} {s[top]:.0%}, {s['sign_flips']} sign flips)"
        )

    def _refresh(self, change: Any = None) -> None:
        sync(self.heatmap, self._figure())
        self.select(self.model.cfg.n_layers - 1, self.clean.shape[1] - 1)

    def _on_click(self, trace: Any, points: Any, state: Any) -> None:
        # Cells are labelled "L<layer>" (rows) and "<pos>: <token>" (columns).
        if points.xs and points.ys:
            layer = int(str(points.ys[0]).removeprefix("L"))
            pos = int(str(points.xs[0]).split(":", 1)[0])
            self.select(layer, pos)

    def _top_k_html(self, columns: list[tuple[str, Tensor]]) -> str:
        head = "".join(f"<th colspan=2>{name}</th>" for name, _ in columns)
        tops = []
        for _, logits in columns:
            probs = torch.softmax(logits[0, -1].double(), dim=-1)
            values, ids = probs.topk(self.top_k)
            tops.append(
                [
                    (self.model.to_string([int(i)]), float(v))
                    for v, i in zip(values, ids, strict=True)
                ]
            )
        rows = []
        for k in range(self.top_k):
            cells = "".join(
                f"<td><code>{html.escape(repr(top[k][0]))}</code></td><td>{top[k][1]:.3f}</td>"
                for top in tops
            )
            rows.append(f"<tr>{cells}</tr>")
        return (
            "<table class='residkit-topk'><thead><tr>"
            + head
            + "</tr></thead><tbody>"
            + "".join(rows)
            + "</tbody></table>"
        )


def patching_explorer(
    model: TransformerBridge,
    clean: Inputs,
    corrupted: Inputs,
    *,
    answer: str | int | None = None,
    wrong: str | int | None = None,
    top_k: int = 8,
    batch_size: int | None = None,
) -> PatchingExplorer:
    """An ipywidgets app for activation patching, per layer and position.

    A heatmap of :func:`~residkit.patching_sweep` (the clean run's activation patched into
    the corrupted run), a dropdown for the hook point (``resid_pre``, ``attn_out``,
    ``mlp_out``) and one for the metric (the logit difference of ``answer`` over ``wrong`` at
    the last position, or the KL from the clean run's next-token distribution); click a cell
    to see the top-k next tokens of that patched run beside the clean and corrupted runs'.

    Args:
        model: A bridge from :func:`residkit.load`.
        clean: The prompt whose activations are patched in.
        corrupted: The prompt patched; same token length as ``clean``.
        answer: The token the clean run should predict (a single-token string or an id);
            default the clean run's top next token.
        wrong: The competing token; default the corrupted run's top next token (its second
            when both runs agree).
        top_k: Rows of the next-token table.
        batch_size: Passed to :func:`~residkit.patching_sweep`.

    Returns:
        A :class:`PatchingExplorer` (an ``ipywidgets.VBox``); display it in a notebook.

    Raises:
        ValueError: prompts of different token lengths, a string that is not one token, a
            bad ``top_k``.

    Examples:
        >>> import residkit
        >>> from residkit.widgets import patching_explorer
        >>> app = patching_explorer(residkit.load("zoo:llama"), "The cat", "The dog")
        >>> app.hook_picker.options, app.sweep.values.shape
        (('resid_pre', 'attn_out', 'mlp_out'), torch.Size([4, 8]))
    """
    clean_t, corrupt_t = to_tokens(model, clean), to_tokens(model, corrupted)
    if clean_t.shape != corrupt_t.shape or clean_t.shape[0] != 1:
        raise ValueError(
            f"clean has shape {tuple(clean_t.shape)} but corrupted has {tuple(corrupt_t.shape)}; "
            "the explorer needs one prompt each, of the same token length"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 50:
        raise ValueError(f"top_k must be an int in 1..50, got {top_k!r}")
    with torch.no_grad():
        clean_top = model(clean_t)[0, -1].topk(2).indices.tolist()
        corrupt_top = model(corrupt_t)[0, -1].topk(2).indices.tolist()
    answer_id = clean_top[0] if answer is None else _token_id(model, answer, "answer")
    if wrong is None:
        wrong_id = corrupt_top[0] if corrupt_top[0] != answer_id else corrupt_top[1]
    else:
        wrong_id = _token_id(model, wrong, "wrong")
    return PatchingExplorer(
        model,
        clean_t,
        corrupt_t,
        answer=answer_id,
        wrong=wrong_id,
        top_k=top_k,
        batch_size=batch_size,
    )


def _token_id(model: TransformerBridge, token: str | int, name: str) -> int:
    if isinstance(token, int) and not isinstance(token, bool):
        if not 0 <= token < model.cfg.d_vocab:
            raise ValueError(
                f"{name} id {token} is outside the vocabulary (0..{model.cfg.d_vocab - 1})"
            )
        return token
    ids = model.tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"{name} {token!r} is {len(ids)} tokens under this tokenizer; pass one token"
        )
    return int(ids[0])
