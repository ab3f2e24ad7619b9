"""The Markov property of the residual stream: patch it whole, get the source's output.

In a pre-norm decoder, block ``l`` reads only the residual stream ``h_l`` (all positions) plus
position information that depends on nothing but the position index. So replacing *all* of
``h_l`` with another prompt's ``h_l`` must reproduce that prompt's output exactly: the same
floating-point operations run on the same bits. :func:`markov_test` checks this at every
layer and reports KL(source || patched) in float64, which is exactly ``0.0`` when the logits
are bitwise equal. Patching only some positions breaks it (the others still carry the target),
which is the negative control.

What is compared. The output distribution is the head (final norm, unembedding, softmax)
applied to the final residual, so a patched run whose final residual is bitwise the source's
has the source's logits, bit for bit, provided the head computes the same bits from the same
input. The test at the final layer is exactly that: the source's final residual run through
the head once more, compared with the source's logits. With ``compare="final_residual"`` (the
default) every other layer's run stops at the final norm and its residual is compared; only
where it differs is the head run (the row's KL is then computed from real logits). With
``compare="logits"`` every patched run computes its logits and they are compared. Each row's
``compared`` column says which.

Cost: a full-position patch at layer ``l`` makes blocks ``0..l-1`` irrelevant, so residkit
does not run them. A full :func:`markov_test` over ``L`` layers runs two full forwards (the
source, captured and scored in one run; the unpatched target, the control) and ``L + 1``
patched runs of ``L - l`` blocks each: ``(L + 1) / 2 + 2`` forwards' worth of blocks. The head
runs three times by default (source, target, final layer), ``L + 3`` times with
``compare="logits"``: on a large vocabulary it costs many blocks (on 2 CPU cores, 161 tokens:
18% of SmolLM2-135M's forward, 6 blocks' time; 69% of Gemma 3 270M's, the time of 44 of its
blocks), which is why the default compares residuals.
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Int
from plotly.subplots import make_subplots
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from residkit._entry import entry
from residkit._validate import choice, text_dict
from residkit.architectures import spec_for
from residkit.capture import Inputs, capture_with_logits, check_layers, to_tokens
from residkit.patching import run_patched, run_patched_to_final

__all__ = [
    "TASKS",
    "Align",
    "Compare",
    "CrossTaskReport",
    "MarkovReport",
    "cross_task_suite",
    "markov_test",
]

Align = Literal["left", "right"]
Compare = Literal["final_residual", "logits"]

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
        rows: Per layer: kl, max_abs_dlogit, bitwise_equal (the patched run's logits are the
            source's, bit for bit), compared (``"final residual"``: the run's final residual
            was bitwise the source's, and the head reproduces the source's logits from it;
            ``"logits"``: the run's logits were computed and compared), control_kl.
        source_tokens, target_tokens: The token counts compared (after any alignment).
        align: ``None`` or how different lengths were aligned.
        model_name: Label of the model.
        head_reproduces: The head (final norm, unembedding) run on the source's final residual
            gave the source's logits bit for bit. Where it does not, no row rests on a
            residual comparison: every layer's logits are computed.

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
    head_reproduces: bool = True

    @property
    def passed(self) -> bool:
        """True only if every patched layer reproduced the source's logits bit for bit."""
        return all(bool(r["bitwise_equal"]) for r in self.rows)

    def __repr__(self) -> str:
        worst = max((float(r["kl"]) for r in self.rows), default=0.0)  # type: ignore[arg-type]
        held = "holds" if self.passed else "fails"
        return (f"MarkovReport({self.model_name or 'model'}: {held} at {len(self.rows)} layers, "
                f"max KL {worst:.3g}; .table, .figure())")  # fmt: skip

    @property
    def reason(self) -> str:
        """Why the property does or does not hold, in one sentence."""
        failed = [r["layer"] for r in self.rows if not r["bitwise_equal"]]
        if failed:
            return f"patched logits differ from the source's at layer(s) {failed}"
        return "every layer's patched logits are bitwise equal to the source's (KL = 0.0)"

    @property
    def table(self) -> pd.DataFrame:
        """Columns: layer, kl, max_abs_dlogit, bitwise_equal, compared, control_kl, align."""
        df = pd.DataFrame(self.rows)
        df["align"] = self.align or "none (equal lengths)"
        return df

    def figure(self, *, title: str | None = None) -> go.Figure:
        """KL per layer: the patched run (0 everywhere when it holds) vs the unpatched control."""
        df = self.table
        fig = go.Figure()
        fig.add_bar(x=df["layer"], y=df["control_kl"], name="control: KL(source || target)")
        fig.add_bar(x=df["layer"], y=df["kl"], name="KL(source || patched)")
        fig.update_layout(
            title=title
            or f"Residual Markov test{f' on {self.model_name}' if self.model_name else ''}: "
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
    compare: Compare = "final_residual",
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
        compare: ``"final_residual"``: each patched run stops at the final norm and its
            residual is compared with the source's bit for bit; the head runs on the source's
            final residual once (it must reproduce the source's logits) and on any run whose
            residual differs. ``"logits"``: every patched run computes its logits (one
            unembedding per layer) and they are compared.

    Returns:
        A :class:`MarkovReport`; ``.passed`` is True only if every layer is bitwise equal.

    Raises:
        ValueError: different lengths without ``align``, identical prompts, a layer out of
            range, an empty prompt, or an unknown ``align`` / ``compare``.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> report = markov_test(model, "1 + 1 = 2", "cats purr")
        >>> report.passed, float(report.table["kl"].max())
        (True, 0.0)
        >>> report.table["compared"].iloc[[0, -1]].tolist()
        ['final residual', 'logits']
        >>> markov_test(model, "1 + 1 = 2", "cats")
        Traceback (most recent call last):
        ...
        ValueError: source has 10 tokens but target has 5; ...
    """
    if align is not None:
        choice("align", align, ("left", "right"))
    choice("compare", compare, ("final_residual", "logits"))
    wanted = check_layers(model, layers)
    src, tgt = _align(to_tokens(model, source), to_tokens(model, target), align)
    if src.shape[0] != 1 or tgt.shape[0] != 1:
        raise ValueError("markov_test compares one source prompt with one target prompt")
    if torch.equal(src, tgt):
        raise ValueError("source and target are the same tokens; the test would show nothing")
    n = model.cfg.n_layers
    captured = sorted({*wanted, n})
    resid, src_logits = capture_with_logits(model, src, captured)
    src_resid = {layer: resid[i] for i, layer in enumerate(captured)}
    report = _patched_rows(model, src, tgt, wanted, src_resid, src_logits, model(tgt), compare)
    if to_tokens(model, source).shape != to_tokens(model, target).shape:
        report.align = align
    return report


def _patched_rows(
    model: TransformerBridge,
    src: Tensor,
    tgt: Tensor,
    wanted: list[int],
    src_resid: dict[int, Tensor],
    src_logits: Tensor,
    tgt_logits: Tensor,
    compare: Compare = "final_residual",
) -> MarkovReport:
    """The test proper, from the source's residuals (``{layer: [1, pos, d_model]}``, the final
    one included) and logits and the target's logits (``residkit verify`` passes the ones its
    other sections computed)."""
    n = model.cfg.n_layers
    # log-softmax of the source once, in float64; a layer's KL needs only its own log-softmax.
    log_p = torch.log_softmax(src_logits.double(), dim=-1)
    p = log_p.exp()
    control = _kl(p, log_p, tgt_logits).max().item()
    # The head on the source's own final residual: the final layer's test, and what lets a
    # bitwise-equal final residual stand for bitwise-equal logits.
    head = run_patched(model, tgt, src_resid[n], n)
    head_equal = torch.equal(head, src_logits)
    rows: list[dict[str, object]] = []
    for layer in wanted:
        if layer == n:
            patched: Tensor | None = head
        elif compare == "logits" or not head_equal:
            patched = run_patched(model, tgt, src_resid[layer], layer)
        else:
            final = run_patched_to_final(model, tgt, src_resid[layer], layer)
            # Differing residuals go through the head too, so the row's KL is measured.
            same = torch.equal(final, src_resid[n])
            patched = None if same else run_patched(model, tgt, final, n)
        # Bitwise-equal logits give bitwise-equal log-softmaxes, whose difference is 0.0 in
        # every term: the float64 KL would return exactly 0.0, and the largest logit
        # difference is 0.0 by definition.
        kl = dlogit = 0.0
        equal = patched is None or torch.equal(patched, src_logits)
        if patched is not None and not equal:
            kl = _kl(p, log_p, patched).max().item()
            dlogit = (patched - src_logits).abs().max().item()
        rows.append(
            {
                "layer": layer,
                "kl": kl,
                "max_abs_dlogit": dlogit,
                "bitwise_equal": equal,
                "compared": "final residual" if patched is None else "logits",
                "control_kl": control,
            }
        )
    return MarkovReport(
        rows=rows,
        source_tokens=src.shape[1],
        target_tokens=tgt.shape[1],
        model_name=spec_for(model).family,
        head_reproduces=head_equal,
    )


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

    def figure(self, *, title: str | None = None) -> go.Figure:
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
            title=title or "Cross-task residual patching at every layer",
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
    compare: Compare = "final_residual",
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
        compare: What each patched run is compared by, as in :func:`markov_test`.
        progress: Show a tqdm bar over pairs.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> suite = cross_task_suite(model, progress=False)  # 5 tasks: 20 ordered pairs
        >>> suite.passed, len(suite.table) == 20 * (model.cfg.n_layers + 1)
        (True, True)
    """
    tasks = TASKS if tasks is None else tasks
    text_dict("tasks", tasks)
    if len(tasks) < 2:
        raise ValueError(f"need at least two tasks to pair, got {list(tasks)}")
    pairs = list(itertools.permutations(tasks, 2))
    out = CrossTaskReport()
    for src, tgt in tqdm(pairs, desc="cross-task pairs", disable=not progress):
        out.reports[(src, tgt)] = markov_test(
            model, tasks[src], tasks[tgt], layers=layers, align=align, compare=compare
        )
    return out
