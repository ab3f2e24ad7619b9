"""The exact memory/compute frontier of KV-Direct: every plan's bytes against its recompute.

Every exact way to decode with a bounded active window trades memory for recomputation: keep
every layer's K/V (the full cache), a residual at every layer (the paper's KV-Direct), a
residual every k layers with the layers between rebuilt by replay (``checkpoint="stride"``),
some layers' K/V kept whole beside them (``keep_top``), or only the token ids. For a context
T and budget B, :func:`kvdirect_frontier` gives each plan's bytes and the FLOPs its recompute
costs per decoded token, computed from the config (:mod:`residkit.policies.plans`), marks the
Pareto front, and with ``measure=True`` checks bytes against the tensors, FLOPs against
torch's operation counter and times a decoding step against the full cache.

:func:`choose` is what ``KVDirect(memory_limit=...)`` uses: the cheapest plan whose bound on
peak memory stays under the limit.

Examples:
    >>> import residkit
    >>> f = residkit.kvdirect_frontier(residkit.load("zoo:llama"), context=64, budget=8)
    >>> f.table.loc[f.table["plan"] == "full cache", "recompute_flops"].item()
    0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from residkit.architectures import spec_for
from residkit.policies.plans import (
    Candidate,
    candidates,
    choose,
    peak_bound,
    plan_bytes,
    plan_flops,
)

__all__ = ["Candidate", "Frontier", "candidates", "choose", "kvdirect_frontier", "peak_bound"]


@dataclass
class Frontier:
    """Every plan's bytes and recompute cost at one context and budget."""

    model: str
    context: int
    budget: int
    rows: list[dict[str, Any]]

    @property
    def table(self) -> pd.DataFrame:
        """Columns: plan, bytes (held between steps), peak_bound (what ``memory_limit``
        compares: held bytes with a ``budget``-token chunk, spare rows and the largest
        recompute's transient), bytes_vs_full, recompute_flops (per decoded token), pareto, and with measurement measured_bytes, counted_flops, step_seconds,
        time_vs_full."""
        return pd.DataFrame(self.rows)

    def figure(self, *, title: str | None = None) -> go.Figure:
        """Bytes against recompute (or measured step time), the Pareto front joined."""
        t = self.table
        timed = "time_vs_full" in t
        y = t["time_vs_full"] if timed else t["recompute_flops"] / 1e9
        fig = go.Figure()
        fig.add_scatter(
            x=t["bytes"] / 1e6, y=y, mode="markers", name="plan", text=t["plan"],
            marker={"color": "#999"}, hovertemplate="%{text}<br>%{x:.2f} MB, %{y:.3g}<extra></extra>",
        )  # fmt: skip
        front = t[t["pareto"]].sort_values("bytes")
        fig.add_scatter(
            x=front["bytes"] / 1e6, y=(y[front.index]), mode="lines+markers+text",
            text=front["plan"], textposition="top right", name="Pareto front",
            marker={"color": "#c0392b", "size": 9},
        )  # fmt: skip
        fig.update_layout(
            title=title
            or f"{self.model}: exact plans at {self.context} tokens, budget {self.budget}",
            xaxis_title="bytes held (MB, float32)",
            yaxis_title="decode step time / full cache" if timed else "recompute GFLOPs / token",
            height=480,
        )
        return fig


def _pareto(rows: list[dict[str, Any]], cost: str) -> None:
    for r in rows:
        r["pareto"] = not any(
            (o["bytes"] <= r["bytes"] and o[cost] <= r[cost])
            and (o["bytes"] < r["bytes"] or o[cost] < r[cost])
            for o in rows
        )


def kvdirect_frontier(
    model_or_config: Any,
    *,
    context: int = 1024,
    budget: int = 64,
    measure: bool = False,
    steps: int = 2,
    name: str | None = None,
    progress: bool = True,
) -> Frontier:
    """Every exact plan's bytes and recompute per decoded token at ``context`` and ``budget``.

    Args:
        model_or_config: A bridge, or an HF config (a :data:`residkit.zoo.PAPER_CONFIGS`
            shape, computed only).
        context: Tokens in the context.
        budget: Active K/V tokens per managed layer.
        measure: Also run every plan on the model (a bridge is needed): bytes from the
            tensors, FLOPs counted by ``torch.utils.flop_counter`` (GEMMs, as predicted),
            decode-step time, all against the full cache in the same run.
        steps: Decoding steps timed per plan when measuring (the best is kept).
        name: Label for the figure.
        progress: Show a progress bar while measuring.

    Examples:
        >>> from residkit.zoo import config_for
        >>> f = kvdirect_frontier(config_for("llama", config="smollm2-135m"), context=256, budget=16,
        ...     progress=False)  # computed from the config alone: no weights are built
        >>> f.table["plan"].tolist()[:3]
        ['full cache', 'layer', 'stride 2']
    """
    from residkit._bridge import hf_config, is_bridge
    from residkit._validate import non_negative_int, positive_int

    positive_int("context", context)
    non_negative_int("budget", budget)
    bridge = is_bridge(model_or_config)
    config = hf_config(model_or_config) if bridge else model_or_config
    spec = spec_for(model_or_config if bridge else config)
    layers = spec.managed_layers(config, "global")
    sliding = spec.sliding_layers(config)
    rows: list[dict[str, Any]] = []
    for c in candidates(layers):
        rows.append(
            {
                "plan": c.plan.name,
                "bytes": plan_bytes(c.plan, config, context, budget, sliding=sliding),
                "peak_bound": peak_bound(c.plan, config, context, budget, budget, sliding),
                # The step that brings the context to ``context`` recomputes what was evicted
                # before it: context - 1 - budget tokens.
                "recompute_flops": plan_flops(
                    c.plan, config, max(0, context - 1 - budget), spec.gated_mlp
                ),
                "_kwargs": c.kwargs,
            }
        )
    full = int(rows[0]["bytes"])
    for r in rows:
        r["bytes_vs_full"] = int(r["bytes"]) / full
    if measure:
        if not bridge:
            raise ValueError("measure=True needs a model, not a config")
        from residkit.policies._measure import measure_plans

        measure_plans(model_or_config, rows, context, budget, steps, progress)
    _pareto(rows, "time_vs_full" if measure else "recompute_flops")
    for r in rows:
        r.pop("_kwargs")
    label = name or str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", ""))
    return Frontier(label, context, budget, rows)
