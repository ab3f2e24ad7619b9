"""What every claim of the reproduction shares: its result, its sizes, its cache on disk."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

__all__ = [
    "ABSTRACT",
    "DIFFERS",
    "HYPOTHESIS",
    "MEASURED",
    "NOT_APPLICABLE",
    "REPRODUCED",
    "SEED_ARTICLE",
    "ClaimResult",
    "Row",
    "Sizes",
    "Timer",
    "caption",
    "judge",
    "load_cached",
    "save_cached",
    "settings_of",
]

Verdict = Literal["reproduced", "differs", "not applicable"]
REPRODUCED: Verdict = "reproduced"
DIFFERS: Verdict = "differs"
NOT_APPLICABLE: Verdict = "not applicable"
_FORMAT = 2  # bump when a claim's output changes, so cached results are recomputed

ABSTRACT = "abstract"
SEED_ARTICLE = "seed article (a summary of the paper, not the paper itself)"
MEASURED = "measured: "
HYPOTHESIS = "hypothesis (untested): "


def caption(figure: str) -> str:
    """The source of a number read from a figure's caption, e.g. ``caption("4")``."""
    return f"Fig. {figure} caption"


def judge(ok: bool) -> Verdict:
    """The verdict of a rule that held (``ok``) or did not."""
    return REPRODUCED if ok else DIFFERS


@dataclass
class Row:
    """One comparison: what the paper says, what residkit measured, and the verdict.

    Attributes:
        model: The model (or "paper configs").
        quantity: What is compared.
        paper: The paper's number.
        residkit: residkit's measurement.
        verdict: ``reproduced`` or ``differs``, computed by ``rule``; or ``not applicable``.
        why: Required unless reproduced. For ``differs`` it starts with ``"measured: "`` (a
            measurement in the same report) or ``"hypothesis (untested): "``.
        rule: The rule the verdict was computed by, stated in words (required unless not
            applicable).
        source: Where the paper's number is written (:data:`ABSTRACT`, :func:`caption`,
            :data:`SEED_ARTICLE`).
    """

    model: str
    quantity: str
    paper: str
    residkit: str
    verdict: Verdict
    why: str = ""
    rule: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.verdict != REPRODUCED and not self.why:
            raise ValueError(f"a {self.verdict!r} row needs a reason: {self.quantity}")
        if self.verdict == DIFFERS and not self.why.startswith((MEASURED, HYPOTHESIS)):
            raise ValueError(
                f"a 'differs' reason is a measurement ({MEASURED!r}...) or a hypothesis "
                f"({HYPOTHESIS!r}...): {self.why!r}"
            )
        if self.verdict != NOT_APPLICABLE and not (self.rule and self.source):
            raise ValueError(f"a {self.verdict!r} row needs its rule and source: {self.quantity}")


@dataclass
class ClaimResult:
    """The measurement of one claim: rows, figures, the data behind them, and its cost.

    Attributes:
        claim: The claim's id (a key of :data:`residkit.reproduction.CLAIMS`).
        title: What the paper claims, in a few words (with its figure).
        rows: The comparisons, one per model and quantity.
        figures: Plotly figures as JSON (kept as JSON so a cached result reloads as it was).
        data: Tables behind the figures, as records.
        seconds: Wall time of the measurement.
        settings: The sizes it ran with.
        commit: The residkit commit that computed it (:func:`residkit.report.commit`).
    """

    claim: str
    title: str
    rows: list[Row]
    figures: list[str] = field(default_factory=list)
    data: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    commit: str = ""

    @property
    def table(self) -> pd.DataFrame:
        """Columns ``model, quantity, paper, residkit, verdict, why, rule, source``."""
        return pd.DataFrame([asdict(r) for r in self.rows])

    @property
    def passed(self) -> bool:
        """Whether every row reproduced the paper."""
        return all(r.verdict == REPRODUCED for r in self.rows)

    def figure(self, *, title: str | None = None, index: int = 0) -> go.Figure:
        """The claim's ``index``-th figure (of ``len(self.figures)``), drawn like the paper's."""
        if not 0 <= index < len(self.figures):
            raise ValueError(f"index={index}: claim {self.claim!r} has {len(self.figures)} figures")
        fig = pio.from_json(self.figures[index])
        if title is not None:
            fig.update_layout(title=title)
        return fig

    def frame(self, name: str) -> pd.DataFrame:
        """One of the tables behind the figures."""
        return pd.DataFrame(self.data[name])

    def to_json(self) -> str:
        return json.dumps({"format": _FORMAT, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> ClaimResult:
        raw = json.loads(text)
        if raw.pop("format", None) != _FORMAT:
            raise ValueError("a result written by another residkit version")
        raw["rows"] = [Row(**r) for r in raw["rows"]]
        return cls(**raw)


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is; :meth:`quick` is small enough for a test."""

    markov_tasks: int = 6
    nocache_tokens: int = 30
    chat_turns: int = 20
    chat_tokens: int = 24
    chat_budget: int = 64
    prompts: int = 16
    prompt_tokens: int = 400
    new_tokens: int = 64
    sample_seed: int = 0
    budgets: tuple[int, ...] = (16, 32, 64, 128, 256)
    grid_lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    fractions: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5)
    grid_prompts: int = 2
    grid_tokens: int = 16
    latency_tokens: tuple[int, ...] = (16, 64, 128, 256, 500)
    latency_batches: tuple[int, ...] = (1, 4, 16)
    repeats: int = 5
    quick: bool = False

    @classmethod
    def quick_sizes(cls) -> Sizes:
        return cls(
            markov_tasks=2,
            nocache_tokens=8,
            chat_turns=3,
            chat_tokens=6,
            chat_budget=16,
            prompts=2,
            prompt_tokens=120,
            new_tokens=6,
            budgets=(16, 64),
            grid_lengths=(64, 128),
            fractions=(0.25, 0.5),
            grid_prompts=1,
            grid_tokens=4,
            latency_tokens=(16, 128),
            latency_batches=(1, 4),
            repeats=2,
            quick=True,
        )


def settings_of(sizes: Sizes) -> dict[str, Any]:
    """``sizes`` as plain JSON values (what a cached result records and is matched on)."""
    return dict(json.loads(json.dumps(asdict(sizes))))


def _path(cache: Path, claim: str, model: str) -> Path:
    return cache / f"{claim}--{model.replace('/', '_')}.json"


def load_cached(cache: Path | None, claim: str, model: str, sizes: Sizes) -> ClaimResult | None:
    """A result computed earlier with the same sizes, or None."""
    if cache is None:
        return None
    path = _path(cache, claim, model)
    try:
        result = ClaimResult.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return result if result.settings == settings_of(sizes) else None


def save_cached(cache: Path | None, model: str, result: ClaimResult) -> None:
    if cache is None:
        return
    cache.mkdir(parents=True, exist_ok=True)
    path = _path(cache, result.claim, model)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(result.to_json())
    tmp.replace(path)


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
