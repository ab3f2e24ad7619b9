"""The Markov property of the residual stream: patch it whole, get the source's output.

In a pre-norm decoder, block ``l`` reads only the residual stream ``h_l`` (all positions) plus
position information that depends on nothing but the position index. So replacing *all* of
``h_l`` with another prompt's ``h_l`` must reproduce that prompt's output exactly: the same
floating-point operations run on the same bits. :func:`markov_test` checks this at every
layer and reports KL(source || patched) in float64, which is exactly ``0.0`` when the logits
are bitwise equal. Patching only some positions breaks it (the others still carry the target),
which is the negative control.

Cost: a full-position patch at layer ``l`` makes blocks ``0..l-1`` irrelevant, so residkit
does not run them. A full :func:`markov_test` over ``L`` layers runs two full forwards (the
source, captured and scored in one run; the unpatched target, the control) and ``L + 1``
patched runs of ``L - l`` blocks each: about ``(L + 1) / 2 + 2`` forwards, not ``L + 3``.
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Int
from plotly.subplots import make_subplots
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import temporary_hooks
from residkit._entry import entry
from residkit._validate import choice
from residkit.architectures import spec_for
from residkit.capture import Inputs, check_layers, to_tokens
from residkit.patching import run_patched

__all__ = ["TASKS", "Align", "CrossTaskReport", "MarkovReport", "cross_task_suite", "markov_test"]

Align = Literal["left", "right"]

TASKS: dict[str, str] = {
    "arithmetic": "Compute: 47 + 38 = 85. 19 * 3 = 57. 64 - 29 =",
    "code": "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints",
    "translation": "English: the cat sleeps. French: le chat dort. English: the dog eats. French:",
    "factual": "The capital of France is Paris. The capital of Japan is Tokyo. The capital of Italy is",
    "copy": "Repeat after me: zebra, violin, copper, maple. Again: zebra, violin, copper,",
}
"""Built-in prompts, one per task family, for :func:`cross_task_suite`."""


@dataclass
class MarkovReport:
    """Result of :func:`markov_test`: one row per patched layer.

    Attributes:
        rows: Per layer: kl, max_abs_dlogit, bitwise_equal, control_kl.
        source_tokens, target_tokens: The token counts compared (after any alignment).
        align: ``None`` or how different lengths were aligned.
        model_name: Label of the model.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> report = residkit.markov_test(model, "1 + 1 = 2", "cats purr", align="right")
        >>> row = report.table.iloc[0]
        >>> int(row["layer"]), float(row["kl"]), bool(row["bitwise_equal"])
        (0, 0.0, True)
    """

    rows: list[dict[str, object]]
    source_tokens: int
    target_tokens: int
    align: Align | None = None
    model_name: str = ""

    @property
    def passed(self) -> bool:
        """True only if every patched layer reproduced the source's logits bit for bit."""
        return all(bool(r["bitwise_equal"]) for r in self.rows)

    @property
    def reason(self) -> str:
        """Why the property does or does not hold, in one sentence."""
        failed = [r["layer"] for r in self.rows if not r["bitwise_equal"]]
        if failed:
            return f"patched logits differ from the source's at layer(s) {failed}"
        return "every layer's patched logits are bitwise equal to the source's (KL = 0.0)"

    @property
    def table(self) -> pd.DataFrame:
        """Columns: layer, kl, max_abs_dlogit, bitwise_equal, control_kl, align."""
        df = pd.DataFrame(self.rows)
        df["align"] = self.align or "none (equal lengths)"
        return df

    def figure(self) -> go.Figure:
        """KL per layer: the patched run (0 everywhere when it holds) vs the unpatched control."""
        df = self.table
        fig = go.Figure()
        fig.add_bar(x=df["layer"], y=df["control_kl"], name="control: KL(source || target)")
        fig.add_bar(x=df["layer"], y=df["kl"], name="KL(source || patched)")
        fig.update_layout(
            title=f"Residual Markov test{f' on {self.model_name}' if self.model_name else ''}: "
            f"{'holds' if self.passed else 'does not hold'}",
            xaxis_title="patched residual layer (n_layers = final)",
            yaxis_title="max KL over positions (nats)",
            barmode="group",
        )
        return fig


def _align(
    src: Int[Tensor, "1 src_pos"], tgt: Int[Tensor, "1 tgt_pos"], align: Align | None
) -> tuple[Tensor, Tensor]:
    if src.shape[1] == tgt.shape[1]:
        return src, tgt
    if align is None:
        raise ValueError(
            f"source has {src.shape[1]} tokens but target has {tgt.shape[1]}; patching all "
            "positions needs equal lengths (pass align='left' or 'right' to truncate both to "
            f"{min(src.shape[1], tgt.shape[1])} tokens)"
        )
    k = min(src.shape[1], tgt.shape[1])
    if align == "left":
        return src[:, :k], tgt[:, :k]
    return src[:, -k:], tgt[:, -k:]


@entry
@torch.no_grad()
def markov_test(
    model: TransformerBridge,
    source: Inputs,
    target: Inputs,
    *,
    layers: Sequence[int] | None = None,
    align: Align | None = None,
) -> MarkovReport:
    """Patch ``source``'s residual into ``target`` at each layer; compare with ``source``.

    Args:
        model: A bridge from :func:`residkit.load`.
        source: The prompt whose residual is patched in (and whose output is expected).
        target: The prompt run with the patch.
        layers: Residual layers ``0..n_layers`` to test; default all.
        align: How to handle different token lengths: ``None`` raises, ``"left"`` keeps the
            first ``k`` tokens of both, ``"right"`` the last ``k`` (``k`` the shorter length).
            The truncated source is then its own reference.

    Returns:
        A :class:`MarkovReport`; ``.passed`` is True only if every layer is bitwise equal.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> report = markov_test(model, "1 + 1 = 2", "cats purr")
        >>> report.passed, float(report.table["kl"].max())
        (True, 0.0)
        >>> markov_test(model, "1 + 1 = 2", "cats")
        Traceback (most recent call last):
        ...
        ValueError: source has 10 tokens but target has 5; ...
    """
    if align is not None:
        choice("align", align, ("left", "right"))
    wanted = check_layers(model, layers)
    src, tgt = _align(to_tokens(model, source), to_tokens(model, target), align)
    if src.shape[0] != 1 or tgt.shape[0] != 1:
        raise ValueError("markov_test compares one source prompt with one target prompt")
    if torch.equal(src, tgt):
        raise ValueError("source and target are the same tokens; the test would show nothing")
    src_resid, src_logits = capture_with_logits(model, src, wanted)
    report = _patched_rows(model, src, tgt, wanted, src_resid, src_logits, model(tgt))
    if to_tokens(model, source).shape != to_tokens(model, target).shape:
        report.align = align
    return report


def _patched_rows(
    model: TransformerBridge,
    src: Tensor,
    tgt: Tensor,
    wanted: list[int],
    src_resid: Tensor,
    src_logits: Tensor,
    tgt_logits: Tensor,
) -> MarkovReport:
    """The test proper, from the source's residuals and logits and the target's logits
    (``residkit verify`` passes the ones its other sections computed)."""
    # log-softmax of the source once, in float64; each layer then costs one patched run
    # (blocks >= layer only) and one log-softmax of its logits.
    log_p = torch.log_softmax(src_logits.double(), dim=-1)
    p = log_p.exp()
    control = _kl(p, log_p, tgt_logits).max().item()
    rows: list[dict[str, object]] = []
    for i, layer in enumerate(wanted):
        patched = run_patched(model, tgt, src_resid[i], layer)
        equal = torch.equal(patched, src_logits)
        rows.append(
            {
                "layer": layer,
                # Bitwise-equal logits give bitwise-equal log-softmaxes, whose difference is
                # 0.0 in every term: the float64 KL below would return exactly 0.0, and the
                # largest logit difference is 0.0 by definition.
                "kl": 0.0 if equal else _kl(p, log_p, patched).max().item(),
                "max_abs_dlogit": 0.0 if equal else (patched - src_logits).abs().max().item(),
                "bitwise_equal": equal,
                "control_kl": control,
            }
        )
    return MarkovReport(
        rows=rows,
        source_tokens=src.shape[1],
        target_tokens=tgt.shape[1],
        model_name=spec_for(model).family,
    )


def capture_with_logits(
    model: TransformerBridge, tokens: Tensor, layers: list[int]
) -> tuple[Tensor, Tensor]:
    """The residuals at ``layers`` (stacked) and the logits, from one forward."""
    spec, n = spec_for(model), model.cfg.n_layers
    store: dict[int, Tensor] = {}

    def keep(layer: int, act: Tensor, hook: object) -> None:
        store[layer] = act.detach().clone()

    hooks = [(spec.resid_hook(layer, n), partial(keep, layer)) for layer in sorted(set(layers))]
    with temporary_hooks(model, hooks):
        logits = model(tokens)
    return torch.stack([store[layer] for layer in layers]), logits


def _kl(p: Tensor, log_p: Tensor, q_logits: Tensor) -> Tensor:
    """KL(P || Q) per position in float64, P given by its probabilities and log-probabilities."""
    return (p * (log_p - torch.log_softmax(q_logits.double(), dim=-1))).sum(-1)


@dataclass
class CrossTaskReport:
    """Result of :func:`cross_task_suite`: a tidy table over (source task, target task, layer).

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> suite = cross_task_suite(model, tasks={"a": "1 + 1", "b": "cats!"}, progress=False)
        >>> sorted(suite.reports), suite.passed
        ([('a', 'b'), ('b', 'a')], True)
    """

    reports: dict[tuple[str, str], MarkovReport] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True if the Markov property held for every pair at every layer."""
        return all(r.passed for r in self.reports.values())

    @property
    def table(self) -> pd.DataFrame:
        """One row per (source_task, target_task, layer)."""
        frames = []
        for (src, tgt), report in self.reports.items():
            df = report.table
            df.insert(0, "target_task", tgt)
            df.insert(0, "source_task", src)
            df["tokens"] = report.source_tokens
            frames.append(df)
        return pd.concat(frames, ignore_index=True)

    def figure(self) -> go.Figure:
        """Two heatmaps over (task pair, layer): control KL and patched KL."""
        df = self.table
        df["pair"] = df["source_task"] + " → " + df["target_task"]
        fig = make_subplots(
            rows=1,
            cols=2,
            subplot_titles=("control: KL(source || target)", "KL(source || patched)"),
            shared_yaxes=True,
        )
        for col, value in ((1, "control_kl"), (2, "kl")):
            grid = df.pivot(index="pair", columns="layer", values=value)
            fig.add_trace(
                go.Heatmap(
                    z=grid.values,
                    x=[str(c) for c in grid.columns],
                    y=list(grid.index),
                    coloraxis="coloraxis",
                ),
                row=1,
                col=col,
            )
        fig.update_layout(
            title="Cross-task residual patching at every layer",
            coloraxis={"colorscale": "Magma"},
            height=max(400, 22 * df["pair"].nunique()),
        )
        fig.update_xaxes(title_text="layer")
        return fig


@entry
def cross_task_suite(
    model: TransformerBridge,
    *,
    tasks: dict[str, str] | None = None,
    layers: Sequence[int] | None = None,
    align: Align = "right",
    progress: bool = True,
) -> CrossTaskReport:
    """:func:`markov_test` for every ordered pair of different tasks, at every layer.

    Prompts of different token lengths are aligned (default ``"right"``: both keep their last
    ``k`` tokens, so each keeps the position where its answer is predicted); the table's
    ``align`` and ``tokens`` columns say so.

    Args:
        model: A bridge from :func:`residkit.load`.
        tasks: ``{name: prompt}``; default :data:`TASKS` (5 task families).
        layers: Residual layers to patch; default all.
        align: Alignment of different lengths, as in :func:`markov_test`.
        progress: Show a tqdm bar over pairs.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> suite = cross_task_suite(model, progress=False)  # 5 tasks: 20 ordered pairs
        >>> suite.passed, len(suite.table) == 20 * (model.cfg.n_layers + 1)
        (True, True)
    """
    tasks = TASKS if tasks is None else tasks
    if len(tasks) < 2:
        raise ValueError(f"need at least two tasks to pair, got {list(tasks)}")
    pairs = list(itertools.permutations(tasks, 2))
    out = CrossTaskReport()
    for src, tgt in tqdm(pairs, desc="cross-task pairs", disable=not progress):
        out.reports[(src, tgt)] = markov_test(
            model, tasks[src], tasks[tgt], layers=layers, align=align
        )
    return out
