"""``residkit verify``: every check residkit has, on one model, as one table.

Each experiment module contributes a *section*: a function ``(model, ctx) -> list[Check]``.
:data:`SECTIONS` lists them in order; the CLI runs them all and exits non-zero when an
exactness claim fails. Sections are cheap by design (one prompt pair, a few dozen tokens),
so ``verify`` on the default small model finishes in seconds on 2 CPU cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch
from transformer_lens.model_bridge import TransformerBridge

from residkit._hooks import hook_count
from residkit.architectures import hf_config, spec_for
from residkit.capture import capture_residuals

__all__ = ["SECTIONS", "Check", "VerifyContext", "VerifyReport", "verify"]

VERIFY_PROMPTS = (
    "Question: what is 17 + 25? Answer:",
    "def fibonacci(n):\n    if n < 2:",
)


@dataclass
class Check:
    """One row of the verify table.

    Attributes:
        section: Which experiment the check belongs to.
        check: What was checked, in a few words.
        result: The measured value, as text.
        passed: True/False for claims, None for information rows.
        figure: Path of a saved HTML figure, if any.
    """

    section: str
    check: str
    result: str
    passed: bool | None = None
    figure: str | None = None


@dataclass
class VerifyContext:
    """What sections share: the output folder for figures and the prompts."""

    out_dir: Path
    prompts: tuple[str, str] = VERIFY_PROMPTS
    figures: bool = True

    def save(self, fig: go.Figure, name: str) -> str | None:
        if not self.figures:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{name}.html"
        fig.write_html(path, include_plotlyjs="cdn")
        return str(path)


@dataclass
class VerifyReport:
    """All checks of one ``verify`` run."""

    model: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def table(self) -> pd.DataFrame:
        """One row per check: section, check, result, passed, figure."""
        return pd.DataFrame([c.__dict__ for c in self.checks])

    @property
    def passed(self) -> bool:
        """True when no claim failed (information rows do not count)."""
        return all(c.passed is not False for c in self.checks)


def _load_section(model: TransformerBridge, ctx: VerifyContext) -> list[Check]:
    spec = spec_for(model)
    cfg = model.cfg
    hf_cfg = hf_config(model)
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    params = sum(p.numel() for p in model.original_model.parameters())
    sliding = spec.sliding_layers(hf_cfg)
    from residkit.registry import provenance

    meta = provenance(model)
    weights = meta["caveat"] if meta else "as stored in the checkpoint"
    return [
        Check("load", "weights", weights, None),
        Check("load", "family", f"{spec.family} ({hf_cfg.model_type})", None),
        Check(
            "load",
            "shape",
            f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
            f"{n_kv} KV heads, d_head {cfg.d_head}, {params / 1e6:.2f}M params",
            None,
        ),
        Check("load", "sliding-window layers", str(list(sliding)) if sliding else "none", None),
        Check(
            "load",
            "inputs bypassing the residual stream",
            ", ".join(spec.bypass_inputs) or "none",
            None,
        ),
    ]


@torch.no_grad()
def _capture_section(model: TransformerBridge, ctx: VerifyContext) -> list[Check]:
    from residkit.viz.residual import residual_norm_figure

    prompt = ctx.prompts[0]
    before = hook_count(model)
    resid = capture_residuals(model, prompt)
    _, cache = model.run_with_cache(prompt)
    spec = spec_for(model)
    n = model.cfg.n_layers
    refs = [cache[spec.resid_hook(layer, n)] for layer in range(n + 1)]
    equal = [torch.equal(resid[layer], refs[layer]) for layer in range(n + 1)]
    # Negative control: the same comparison one layer off must see a difference.
    shifted = [not torch.equal(resid[layer], refs[layer + 1]) for layer in range(n)]
    fig = residual_norm_figure(resid, str_tokens=list(map(str, model.to_str_tokens(prompt))))
    return [
        Check(
            "capture",
            "capture_residuals == run_with_cache (bitwise, all layers)",
            f"{sum(equal)}/{n + 1} layers equal",
            all(equal),
            ctx.save(fig, "residual_norms"),
        ),
        Check(
            "capture",
            "negative control: layer l vs cache l+1 differs",
            f"{sum(shifted)}/{n} layers differ",
            all(shifted),
        ),
        Check(
            "capture",
            "no hooks left on the model",
            f"{hook_count(model) - before} added",
            hook_count(model) == before,
        ),
    ]


def _markov_section(model: TransformerBridge, ctx: VerifyContext) -> list[Check]:
    from residkit.patching import markov_section

    return markov_section(model, ctx)


def _kv_section(model: TransformerBridge, ctx: VerifyContext) -> list[Check]:
    from residkit.reconstruction import reconstruction_section

    return reconstruction_section(model, ctx)


def _spectra_section(model: TransformerBridge, ctx: VerifyContext) -> list[Check]:
    from residkit.spectra import spectra_section

    return spectra_section(model, ctx)


def _kvdirect_section(model: TransformerBridge, ctx: VerifyContext) -> list[Check]:
    from residkit.policies.kvdirect import kvdirect_section

    return kvdirect_section(model, ctx)


def _baselines_section(model: TransformerBridge, ctx: VerifyContext) -> list[Check]:
    from residkit.comparison import baselines_section

    return baselines_section(model, ctx)


SECTIONS: list[tuple[str, Callable[[TransformerBridge, VerifyContext], list[Check]]]] = [
    ("load", _load_section),
    ("capture", _capture_section),
    ("markov", _markov_section),
    ("kv", _kv_section),
    ("qk_spectra", _spectra_section),
    ("kvdirect", _kvdirect_section),
    ("baselines", _baselines_section),
]
"""(name, section function), in the order ``verify`` runs them."""


def verify(
    model: TransformerBridge,
    *,
    name: str = "model",
    out_dir: str | Path = "residkit-verify",
    sections: list[str] | None = None,
    figures: bool = True,
    progress: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Run every check residkit has on ``model``.

    Args:
        model: A bridge from :func:`residkit.load`.
        name: Label for the report.
        out_dir: Where figures are written (HTML).
        sections: Subset of section names to run (default: all).
        figures: Write figures (off in tests that only need the numbers).
        progress: Called with each section's name before it runs.

    Returns:
        A :class:`VerifyReport`; ``.passed`` is False if any exactness claim failed.

    Example:
        >>> import residkit, tempfile
        >>> model = residkit.load("zoo:llama")
        >>> report = verify(model, sections=["capture"], figures=False)
        >>> report.passed
        True
    """
    known = [s for s, _ in SECTIONS]
    if sections is not None:
        unknown = sorted(set(sections) - set(known))
        if unknown:
            raise ValueError(f"unknown verify section(s) {unknown}; known: {', '.join(known)}")
    ctx = VerifyContext(out_dir=Path(out_dir), figures=figures)
    report = VerifyReport(model=name)
    start = time.perf_counter()
    for section, run in SECTIONS:
        if sections is not None and section not in sections:
            continue
        if progress is not None:
            progress(section)
        report.checks.extend(run(model, ctx))
    report.seconds = time.perf_counter() - start
    return report
