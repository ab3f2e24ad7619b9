"""Figure 5: effective rank of W_Q W_K^T at 90% energy per KV head and layer; layer 0 near rank 1.

Each dot is one KV head at one layer, as in the paper. Under grouped-query attention a KV head
serves several query heads, each with its own W_Q^h W_K^T; the dot is their mean rank, and the
table gives the min and max too. Both readings of the norm are shown: the raw projections, and
with the pre-attention norm's gain folded in (what attention applies to the normalised
residual). The quantisation bound (one more round of the GGUF's own 4-bit noise) says how much
of each number the 4-bit weights could move.

"Layer 0 consistently shows near-rank-1 heads" (the caption) has two readings, both tested:
*exists* (some layer-0 query head has rank <= 2) and *all* (every layer-0 query head has).
"Near rank 1" is taken as rank <= 2 at 90% energy.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import hf_config
from residkit.architectures import spec_for
from residkit.quantisation import QUANTISABLE, attention_weight_types, requantisation_effect
from residkit.registry import provenance
from residkit.reproduction.base import (
    MEASURED,
    NOT_APPLICABLE,
    ClaimResult,
    Row,
    Sizes,
    caption,
    judge,
    settings_of,
)
from residkit.spectra import qk_spectra

TITLE = "Effective rank of W_Q W_K^T per KV head at 90% energy; layer 0 near rank 1 (Fig. 5)"


def _figure(
    name: str, tables: dict[str, pd.DataFrame], global_layers: set[int], sliding: bool
) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=list(tables), horizontal_spacing=0.08)
    for col, (label, table) in enumerate(tables.items(), start=1):
        t = table  # per_kv_head table
        frac = t["mean_rank_fraction"]
        fig.add_scatter(
            x=t["layer"],
            y=t["kv_head"],
            mode="markers",
            marker={
                "color": frac,
                "colorscale": "RdBu_r",
                "cmin": 0,
                "cmax": 1,
                "size": 6 + 22 * frac,
                "showscale": col == 2,
                "colorbar": {"title": "rank / d_head"},
                "line": {
                    "width": [
                        2 if sliding and int(layer) in global_layers else 0 for layer in t["layer"]
                    ],
                    "color": "black",
                },
            },
            text=[
                f"layer {r.layer} KV head {r.kv_head}: mean rank {r.mean_rank:.1f} "
                f"(query heads {r.min_rank}-{r.max_rank})"
                for r in t.itertuples()
            ],
            hoverinfo="text",
            name=label,
            showlegend=False,
            row=1,
            col=col,
        )
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="KV head", dtick=1)
    note = "; outlined dots: global-attention layers" if sliding else ""
    fig.update_layout(title=f"{name}: effective rank at 90% energy per KV head{note}", height=420)
    return fig


def run(models: dict[str, TransformerBridge], sizes: Sizes, progress: bool) -> ClaimResult:
    rows, figures, data = [], [], {}
    for name, model in models.items():
        spec, config = spec_for(model), hf_config(model)
        sliding = bool(spec.sliding_layers(config))
        global_layers = set(spec.global_layers(config))
        tables: dict[str, pd.DataFrame] = {}
        for fold in (False, True):
            spectra = qk_spectra(model, fold_norm=fold, name=name)
            per_kv = spectra.per_kv_head(0.9)
            label = "norm gain folded" if fold else "raw W_Q, W_K"
            tables[label] = per_kv
            data[f"{name}: {label}"] = per_kv.to_dict("records")
            heads = spectra.effective_rank(0.9)
            layer0 = heads[heads["layer"] == 0]["rank"]
            rest = heads[heads["layer"] > 0]["rank"]
            lows = int((layer0 <= 2).sum())
            for reading, ok in (("exists", lows > 0), ("all", lows == len(layer0))):
                rows.append(
                    Row(
                        name,
                        f"layer-0 query heads' effective rank at 90% energy ({label}, of "
                        f"d_head={spectra.d_head}), reading '{reading}'",
                        "near rank 1",
                        f"{lows} of {len(layer0)} layer-0 heads at rank <= 2; layer 0 "
                        f"{int(layer0.min())}-{int(layer0.max())}, other layers "
                        f"{int(rest.min())}-{int(rest.max())}",
                        judge(ok),
                        ""
                        if ok
                        else f"{MEASURED}{len(layer0) - lows} of {len(layer0)} layer-0 heads have "
                        f"rank above 2 (up to {int(layer0.max())} of {spectra.d_head})",
                        rule="some layer-0 head at rank <= 2"
                        if reading == "exists"
                        else "every layer-0 head at rank <= 2",
                        source=caption("5"),
                    )
                )
        types = attention_weight_types(model)
        if provenance(model) is not None and not (len(types) == 1 and types <= set(QUANTISABLE)):
            rows.append(
                Row(
                    name,
                    "one more round of the GGUF's own noise on W_Q, W_K",
                    "(the paper's weights are bf16)",
                    "not measured",
                    NOT_APPLICABLE,
                    f"W_Q, W_K are {', '.join(sorted(types))} in this GGUF; gguf's Python "
                    f"quantiser makes only {', '.join(QUANTISABLE)}, so no bound here",
                )
            )
        elif provenance(model) is not None:
            bound = requantisation_effect(model)
            rows.append(
                Row(
                    name,
                    f"one more round of {bound.qtype} noise on W_Q, W_K (weights move "
                    f"{bound.weight_rel_error:.1%})",
                    "(the paper's weights are bf16)",
                    f"any head's rank moves by at most {bound.max_abs_delta}",
                    NOT_APPLICABLE,
                    "a bound on what the 4-bit weights used here can change in the ranks above",
                )
            )
        figures.append(_figure(name, tables, global_layers, sliding).to_json())
    return ClaimResult("ranks", TITLE, rows, figures, data, settings=settings_of(sizes))
