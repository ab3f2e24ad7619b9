"""``residkit reproduce``: every claim of arXiv 2603.19664, measured on real weights.

One module per claim; each returns a :class:`~residkit.reproduction.base.ClaimResult` whose
``.table`` sets the paper's number beside residkit's measurement with a verdict
(``reproduced``, ``differs`` or ``not applicable``, the last two with the reason in one
sentence) and whose ``.figure()`` is drawn like the paper's figure.

Results are cached per claim on disk, so an interrupted run resumes where it stopped.

Examples:
    >>> from residkit.reproduction import CLAIMS
    >>> list(CLAIMS)
    ['markov', 'nocache', 'anatomy', 'chat', 'baselines', 'fractions', 'ranks', 'latency']
"""

from __future__ import annotations

import importlib
import json
import re
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from residkit import report
from residkit._cells import CellStore
from residkit._paths import home
from residkit.registry import REAL_MODELS, provenance
from residkit.reproduction import (
    anatomy,
    baselines,
    chat,
    fractions,
    latency,
    markov,
    nocache,
    ranks,
)
from residkit.reproduction.base import (
    NOT_APPLICABLE,
    ClaimResult,
    Row,
    Sizes,
    load_cached,
    save_cached,
    settings_of,
)

__all__ = ["CLAIMS", "ClaimResult", "Reproduction", "Sizes", "reproduce"]

Run = Callable[..., ClaimResult]

CLAIMS: dict[str, tuple[str, Run]] = {
    "markov": (markov.TITLE, markov.run),
    "nocache": (nocache.TITLE, nocache.run),
    "anatomy": (anatomy.TITLE, anatomy.run),
    "chat": (chat.TITLE, chat.run),
    "baselines": (baselines.TITLE, baselines.run),
    "fractions": (fractions.TITLE, fractions.run),
    "ranks": (ranks.TITLE, ranks.run),
    "latency": (latency.TITLE, latency.run),
}
"""Claim id -> (what the paper claims, the function that measures it)."""

RESUMABLE = ("baselines", "fractions")
"""Claims whose runs take ``cells=``: a file where each finished cell is kept, so that a run of
hours stopped part way resumes at its first unfinished cell rather than at the claim's start."""

DEFAULT_MODELS = tuple(REAL_MODELS)


@dataclass
class Reproduction:
    """Every claim measured in one run."""

    models: list[str]
    results: list[ClaimResult]
    sizes: Sizes
    seconds: float = 0.0
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def table(self) -> pd.DataFrame:
        """One row per comparison: ``claim, model, quantity, paper, residkit, verdict, why,
        rule, source``."""
        frames = []
        for result in self.results:
            t = result.table
            t.insert(0, "claim", result.claim)
            frames.append(t)
        return pd.concat(frames, ignore_index=True)

    @property
    def passed(self) -> bool:
        """True when every row reproduced the paper (rarely: the point is to show where not)."""
        return all(r.passed for r in self.results)

    def text(self, width: int = 100) -> str:
        """The table as plain text no wider than ``width`` columns (what the CLI prints)."""
        lines = []
        for row in self.table.itertuples():
            lines.append(f"{row.claim} | {row.model} | {str(row.verdict).upper()}")
            for label, value in (
                ("", row.quantity),
                ("paper: ", row.paper),
                ("residkit: ", row.residkit),
                ("why: ", row.why),
            ):
                if value:
                    lines.extend(
                        textwrap.wrap(
                            f"{label}{value}",
                            width,
                            initial_indent="    ",
                            subsequent_indent="      ",
                        )
                    )
        counts = self.table["verdict"].value_counts().to_dict()
        summary = ", ".join(f"{n} {verdict}" for verdict, n in counts.items())
        lines.append(f"{len(self.table)} comparisons in {self.seconds:.0f} s: {summary}")
        return "\n".join(lines)

    def result(self, claim: str) -> ClaimResult:
        """The measurement of one claim (its ``.figure(index=...)`` draws its figures)."""
        for result in self.results:
            if result.claim == claim:
                return result
        raise ValueError(f"claim={claim!r} was not run; this run has {self.claims}")

    @property
    def claims(self) -> list[str]:
        """The claims this run measured, in order."""
        return [r.claim for r in self.results]

    def figure(self, *, title: str | None = None) -> go.Figure:
        """Verdicts per claim: one stacked bar of comparisons per claim, coloured by verdict."""
        counts = self.table.groupby(["claim", "verdict"]).size().unstack(fill_value=0)
        counts = counts.reindex(self.claims)
        colours = {"reproduced": "#2e7d32", "differs": "#c62828", "not applicable": "#9e9e9e"}
        fig = go.Figure()
        for verdict in counts.columns:
            fig.add_bar(
                x=counts.index,
                y=counts[verdict],
                name=str(verdict),
                marker_color=colours.get(str(verdict), "#555"),
            )
        fig.update_layout(
            barmode="stack",
            title=title or f"residkit reproduce: {len(self.table)} comparisons",
            xaxis_title="claim",
            yaxis_title="comparisons",
        )
        return fig

    def sections(self) -> list[report.Section]:
        out = []
        for result in self.results:
            out.append(
                report.Section(
                    f"{result.claim}. The paper: {result.title}",
                    f"{describe(result.claim)} Measured in {result.seconds:.0f} s.",
                    result.table,
                    [result.figure(index=i) for i in range(len(result.figures))],
                )
            )
        return out

    def to_json(self) -> str:
        """Everything the page shows, as JSON (:meth:`from_json` reads it back)."""
        return json.dumps(
            {
                "models": self.models,
                "results": [json.loads(r.to_json()) for r in self.results],
                "sizes": settings_of(self.sizes),
                "seconds": self.seconds,
                "meta": self.meta,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Reproduction:
        raw = json.loads(text)
        sizes = raw["sizes"]
        sizes = Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in sizes.items()})  # type: ignore[arg-type]
        results = [ClaimResult.from_json(json.dumps(r)) for r in raw["results"]]
        return cls(raw["models"], results, sizes, raw["seconds"], raw["meta"])

    def write_report(self, path: str | Path) -> Path:
        """One self-contained HTML file: every table and figure, provenance, versions."""
        summary = report.Section(
            "Summary",
            "Each row sets the paper's number beside residkit's; 'differs' rows say why.",
            self.table[["claim", "model", "quantity", "paper", "residkit", "verdict", "why"]],
        )
        return report.write(
            path,
            "residkit reproduce: arXiv 2603.19664 on real weights",
            [summary, *self.sections()],
            self.meta,
        )


def describe(claim: str) -> str:
    """How ``claim`` is measured: its module's docstring after the summary, as one paragraph."""
    module = importlib.import_module(CLAIMS[claim][1].__module__)
    parts = (module.__doc__ or "").split("\n\n", 1)
    # Sphinx roles (:mod:`~a.b`) read as plain code on a page: `b`.
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: f"`{m.group(1).split('.')[-1]}`", parts[-1])
    return " ".join(text.replace("``", "`").split())


def _provenances(names: Sequence[str], loaded: dict[str, TransformerBridge]) -> dict[str, str]:
    out = {}
    for name in names:
        meta = provenance(loaded[name]) if name in loaded else None
        if meta is not None:
            out[f"model {name}"] = str(meta["caveat"])
        elif name in REAL_MODELS:
            out[f"model {name}"] = REAL_MODELS[name].caveat
        else:
            out[f"model {name}"] = "weights as stored in the checkpoint"
    return out


def _not_run(claim: str, models: Sequence[str], why: str, sizes: Sizes, commit: str) -> ClaimResult:
    rows = [
        Row(m, "the whole claim at these sizes", describe(claim).split(".")[0], f"not run: {why}",
            NOT_APPLICABLE, "left out of this run for its cost")
        for m in models
    ]  # fmt: skip
    return ClaimResult(claim, CLAIMS[claim][0], rows, settings=settings_of(sizes), commit=commit)


def reproduce(
    models: Sequence[str] = DEFAULT_MODELS,
    *,
    claims: Sequence[str] | None = None,
    quick: bool = False,
    cache: str | Path | None = "default",
    report_path: str | Path | None = None,
    progress: bool = True,
    load: Callable[[str], TransformerBridge] | None = None,
    not_run: Mapping[str, str] | None = None,
) -> Reproduction:
    """Measure the paper's claims on ``models``.

    Args:
        models: Model names for :func:`residkit.load` (default: both real models).
        claims: Claim ids of :data:`CLAIMS` (default: all).
        quick: Reduced sizes (:meth:`Sizes.quick_sizes`), a few minutes on 2 cores.
        cache: Folder of per-claim results to resume from (``"default"``:
            ``residkit home / "reproduce" / "quick" | "full"``; None: no cache).
        report_path: Also write the self-contained HTML report there.
        progress: Show progress bars per claim and per model.
        load: How to load a model by name (default :func:`residkit.load`).
        not_run: Claims left out, each with why (``{"baselines": "about 78 minutes on 2
            cores"}``): each gets a row per model saying "not run: WHY", verdict not applicable,
            so the tables still have a row per claim.

    Raises:
        ValueError: an unknown claim id, an empty model list, or a not_run reason that
            starts with "not run" (the row already says it).

    Examples:
        >>> import residkit
        >>> result = residkit.reproduce(["zoo:llama"], claims=["markov"], quick=True, cache=None,
        ...     progress=False)
        >>> result.table[["claim", "model"]].iloc[0].tolist()
        ['markov', 'zoo:llama']
    """
    import residkit

    chosen = list(CLAIMS) if claims is None else list(claims)
    skipped = dict(not_run or {})
    unknown = sorted((set(chosen) | set(skipped)) - set(CLAIMS))
    if unknown:
        raise ValueError(f"unknown claim(s) {unknown}; known: {', '.join(CLAIMS)}")
    # The row reads "not run: WHY", so a reason that says it again reads twice.
    doubled = {c: why for c, why in skipped.items() if why.strip().lower().startswith("not run")}
    if doubled:
        raise ValueError(
            f"not_run reasons are shown after 'not run: '; give only the reason, got {doubled!r}"
        )
    if not models or isinstance(models, str):
        raise ValueError(f"models must be a non-empty list of names, got {models!r}")
    sizes = Sizes.quick_sizes() if quick else Sizes()
    folder = None
    if cache is not None:
        folder = (
            Path(home() / "reproduce" / ("quick" if quick else "full"))
            if cache == "default"
            else Path(cache)
        )
    key = "+".join(models)
    start = time.perf_counter()
    commit = report.commit()  # the code this process runs, whatever lands while it does
    loaded: dict[str, TransformerBridge] = {}
    results = []
    for claim in tqdm(chosen, desc="claims", disable=not progress):
        if claim in skipped:
            results.append(_not_run(claim, models, skipped[claim], sizes, commit))
            continue
        result = load_cached(folder, claim, key, sizes)
        if result is None:
            if not loaded:  # only when some claim is not cached yet
                loaded = {name: (load or residkit.load)(name) for name in models}
            t0 = time.perf_counter()
            extra = {}
            if folder is not None and claim in RESUMABLE:
                extra["cells"] = folder / f"{claim}--{key}.cells.jsonl"
            result = CLAIMS[claim][1](loaded, sizes, progress, **extra)
            result.seconds = time.perf_counter() - t0
            if "cells" in extra:  # cells read back took their time in earlier processes
                result.seconds = max(result.seconds, CellStore(extra["cells"]).seconds())
            result.commit = commit
            save_cached(folder, key, result)
        results.append(result)
    meta = {
        **report.environment(),
        **_provenances(models, loaded),
        "sizes": "quick" if quick else "full",
    }
    out = Reproduction(list(models), results, sizes, time.perf_counter() - start, meta)
    if report_path is not None:
        out.write_report(report_path)
    return out
