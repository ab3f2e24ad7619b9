"""Figures 2 and 3c: per-token memory, all-layer K/V against one residual, and what KV-Direct's
layer checkpoints really cost.

The paper's ratio (7-27x) compares all-layer K/V with *one* residual vector per token. A
residual checkpoint from which a layer's K/V can be recomputed by a norm and two projections
is the residual *at that layer*: one per global layer per token. Both accountings are
computed from each config (bf16, as the paper reports) and, for the real models, checked
against the bytes the tensors of a KV-Direct run actually take (float32, as loaded).
"""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import hf_config
from residkit.accounting import per_token_bytes
from residkit.generation import generate
from residkit.policies import FullCache, KVDirect
from residkit.reproduction.base import (
    ABSTRACT,
    MEASURED,
    ClaimResult,
    Row,
    Sizes,
    caption,
    judge,
    settings_of,
)
from residkit.zoo import PAPER_CONFIGS, config_for

TITLE = "Per-token memory: all-layer K/V vs one residual, 7-27x (Figures 2 and 3c)"
KIB = 1024


def _bf16_rows(models: dict[str, TransformerBridge]) -> list[dict[str, Any]]:
    rows = []
    for key, entry in PAPER_CONFIGS.items():
        b = per_token_bytes(config_for(entry["family"], config=key), family=entry["family"])
        rows.append({"model": key, "source": "paper config", **b})
    for name, model in models.items():
        rows.append({"model": name, "source": "real model", **per_token_bytes(hf_config(model))})
    return rows


def _measured(model: TransformerBridge) -> dict[str, float]:
    """Bytes per token the tensors of a short run take (the model's own dtype)."""
    prompt = "Per-token memory, measured from the tensors themselves."
    full = generate(model, prompt, max_new_tokens=4, policy=FullCache(), stop_at_eos=False)
    kvd = generate(
        model, prompt, max_new_tokens=4, policy=KVDirect(0, mode="fast"), stop_at_eos=False
    )
    fed = len(full.prompt_tokens) + 3
    return {
        "kv_all_layers": full.stats.active_kv_bytes / fed,
        "residual_per_global_layer": kvd.stats.checkpoint_bytes / fed,
    }


def _squares(table: list[dict[str, Any]]) -> go.Figure:
    cols = 5
    n = len(table)
    fig = make_subplots(
        rows=math.ceil(n / cols),
        cols=cols,
        subplot_titles=[
            f"{r['model']}<br>{int(r['kv_all_layers']) / int(r['residual_one']):.1f}x"
            for r in table
        ],
        horizontal_spacing=0.03,
        vertical_spacing=0.16,
    )
    for i, r in enumerate(table):
        row, col = i // cols + 1, i % cols + 1
        axis = "" if i == 0 else str(i + 1)
        kv = float(r["kv_all_layers"])
        parts = [
            ("K/V, all layers", kv, "#bbbbbb", "rgba(187,187,187,0.5)"),
            ("residual per global layer", float(r["residual_per_global_layer"]), "#e67e22", None),
            ("one residual", float(r["residual_one"]), "#1f77b4", "rgba(31,119,180,0.8)"),
        ]
        for label, size, line, fill in parts:
            side = math.sqrt(size / kv)
            fig.add_shape(
                type="rect",
                x0=0,
                y0=0,
                x1=side,
                y1=side,
                xref=f"x{axis}",
                yref=f"y{axis}",
                line={"color": line, "width": 2, "dash": "dot" if fill is None else "solid"},
                fillcolor=fill or "rgba(0,0,0,0)",
                name=label,
            )
        top = max(1.0, math.sqrt(float(r["residual_per_global_layer"]) / kv))
        fig.update_xaxes(range=[0, top * 1.05], visible=False, row=row, col=col)
        fig.update_yaxes(
            range=[0, top * 1.05], visible=False, scaleanchor=f"x{axis}", row=row, col=col
        )
    for label, colour in (
        ("K/V, all layers (outer)", "#bbbbbb"),
        ("one residual (paper)", "#1f77b4"),
        ("residual per global layer (KV-Direct layer checkpoints)", "#e67e22"),
    ):
        fig.add_scatter(
            x=[None],
            y=[None],
            mode="markers",
            name=label,
            marker={"color": colour, "symbol": "square"},
        )
    fig.update_layout(
        title="Per-token memory anatomy (bf16): areas proportional to bytes; ratio = K/V / one residual",
        height=280 * math.ceil(n / cols) + 120,
        showlegend=True,
        legend={"orientation": "h", "y": -0.08},
    )
    fig.update_annotations(font_size=12)
    return fig


def _bars(table: list[dict[str, Any]]) -> go.Figure:
    models = [str(r["model"]) for r in table]
    fig = go.Figure()
    for key, label in (
        ("kv_all_layers", "K/V, all layers"),
        ("kv_global_layers", "K/V, global layers"),
        ("residual_per_global_layer", "residual per global layer"),
        ("residual_one", "one residual"),
    ):
        fig.add_bar(x=models, y=[int(r[key]) / KIB for r in table], name=label)
    fig.update_layout(
        title="Per-token memory across models (bf16, KiB, log scale)",
        yaxis={"type": "log", "title": "KiB per token"},
        barmode="group",
    )
    return fig


def run(models: dict[str, TransformerBridge], sizes: Sizes, progress: bool) -> ClaimResult:
    table = _bf16_rows(models)
    rows = []
    ratios = {
        str(r["model"]): int(r["kv_all_layers"]) / int(r["residual_one"])
        for r in table
        if r["source"] == "paper config"
    }
    low, high = min(ratios, key=ratios.__getitem__), max(ratios, key=ratios.__getitem__)
    inside = all(7 <= round(x) <= 27 for x in ratios.values())
    rows.append(
        Row(
            "paper configs",
            f"all-layer K/V / one residual, per token, over the {len(ratios)} published configs "
            "residkit lists (the paper says six models and names four families)",
            "7-27x across six models",
            f"{ratios[low]:.2f}x ({low}) to {ratios[high]:.2f}x ({high})",
            judge(inside),
            ""
            if inside
            else f"{MEASURED}"
            + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items() if not 7 <= round(v) <= 27),
            rule="every ratio, rounded to a whole number as the paper's range is given, in 7-27",
            source=caption("3c"),
        )
    )
    g4 = next(r for r in table if r["model"] == "gemma-3-4b")
    kv, one = int(g4["kv_all_layers"]), int(g4["residual_one"])
    readings = {"KiB (1,024 B)": 1024, "kB (1,000 B)": 1000}
    fits = [k for k, unit in readings.items() if (round(kv / unit), round(one / unit)) == (136, 5)]
    rows.append(
        Row(
            "gemma-3-4b",
            "bytes per token, bf16",
            "136 KB of K/V vs 5 KB for one residual",
            f"{kv:,} B vs {one:,} B: "
            + "; ".join(f"{kv / u:.1f} vs {one / u:.1f} {k}" for k, u in readings.items())
            + (f"; the paper's KB is {' or '.join(fits)}" if fits else ""),
            judge(bool(fits)),
            "" if fits else f"{MEASURED}neither reading of KB gives 136 and 5",
            rule="both numbers round to the paper's under one reading of KB (1,000 or 1,024 B)",
            source=ABSTRACT,
        )
    )
    for r in table:
        cost = int(r["residual_per_global_layer"]) / int(r["kv_global_layers"])
        rows.append(
            Row(
                str(r["model"]),
                "KV-Direct layer checkpoints / the K/V they replace, per token",
                "one residual per token (5 KB vs 136 KB on Gemma 3-4B)",
                f"{cost:.2f}x: {int(r['residual_per_global_layer'])} B of residuals for "
                f"{int(r['kv_global_layers'])} B of global-layer K/V",
                judge(cost < 1),
                ""
                if cost < 1
                else f"{MEASURED}recomputing a layer's K/V needs the residual at that layer, one "
                f"per global layer per token: {int(r['residual_per_global_layer'])} B against "
                f"{int(r['kv_global_layers'])} B of K/V",
                rule="layer checkpoints smaller than the K/V they replace (ratio < 1)",
                source=ABSTRACT,
            )
        )
    measured = {}
    for name, model in models.items():
        got = _measured(model)
        want = per_token_bytes(
            hf_config(model), dtype_bytes=next(model.parameters()).element_size()
        )
        match = all(got[k] == want[k] for k in got)
        measured[name] = {**got, **{f"formula_{k}": want[k] for k in got}}
        rows.append(
            Row(
                name,
                "bytes per token measured from the tensors vs the formula (float32)",
                "(the accounting above)",
                f"K/V {got['kv_all_layers']:.0f} B (formula {want['kv_all_layers']}), layer "
                f"checkpoints {got['residual_per_global_layer']:.0f} B "
                f"(formula {want['residual_per_global_layer']})",
                judge(match),
                "" if match else f"{MEASURED}the tensors hold other sizes than the formula",
                rule="bytes read from the tensors equal the formula's",
                source="residkit's own check (no paper number)",
            )
        )
    return ClaimResult(
        "anatomy",
        TITLE,
        rows,
        [_squares(table).to_json(), _bars(table).to_json()],
        {"bf16": table, "measured": [{"model": k, **v} for k, v in measured.items()]},
        settings=settings_of(sizes),
    )
