"""Figure 4 at equal total memory: budgets as a share of the prompt, prompts of 256-2,048 tokens.

Figure 4 compares policies at equal *budgets*, but every policy there attends the whole prompt
at prefill, so the first step always matches and the peak K/V is the whole prompt's for every
policy. Here no policy sees the whole prompt at once: for a prompt of ``L`` tokens and a share
``f``, every policy runs at budget ``B = f L`` with the prompt fed in chunks of ``B`` tokens.
Each eviction baseline then peaks at ``2B`` tokens of K/V (measured). KV-Direct runs at the
same *total* memory: the peak total bytes Window measured in that cell (active K/V during a
forward + checkpoints + transients) is KV-Direct's ``memory_limit``; it gets the largest budget
(at most ``B``, prefill chunks of the same size) at which residkit's planner finds an exact plan
whose peak bound fits, the plan with the least recompute there, or none. Each run is compared with the full cache fed the same chunks (so
KV-Direct's tokens can be bitwise the same); token match and KL each on its own text
(:mod:`residkit.comparison.readings`) are means over prompts. Layers the model bounds itself
(Gemma 3's 512-token sliding windows) keep the model's own cache under every policy and count
in every peak alike.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
import transformers
from plotly.subplots import make_subplots
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from residkit._cells import CellStore, model_fingerprint
from residkit.generation import generate
from residkit.metrics import kl_divergence
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
from residkit.reproduction.baselines import BASELINES, methods
from residkit.reproduction.prompts import prompt_set

TITLE = "Figure 4 at equal total memory, budgets 5-50% of prompts of 256-2,048 tokens"
MB = 1e6


def _cell(model: TransformerBridge, ids: torch.Tensor, budget: int, n_new: int) -> list[dict]:
    """Every policy at one (prompt, budget): peak memory, token match and KL against the full
    cache fed the same chunks."""
    kw: dict[str, Any] = {"max_new_tokens": n_new, "return_logits": True, "stop_at_eos": False}
    full = generate(model, ids, policy=FullCache(prefill_chunk=budget), **kw)
    chosen = methods("global")
    out, target = [], 0
    for name in BASELINES:
        policy = chosen[name](budget)
        policy = dataclasses.replace(policy, prefill_chunk=budget)  # type: ignore[call-arg]
        gen = generate(model, ids, policy=policy, **kw)
        target = gen.stats.peak_total_bytes if name == "window" else target
        out.append(_record(name, "", gen, full))
    plan = _kvdirect_within(model, target, ids.shape[1] + n_new, budget)
    if plan is None:
        out.append({"policy": "kvdirect", "plan": "no exact plan fits at any budget",
                    "peak_total_bytes": 0, "match": float("nan"), "own_kl": float("nan"),
                    "fits": False})  # fmt: skip
    else:
        gen = generate(model, ids, policy=plan, **kw)
        out.append(_record("kvdirect", _plan_name(plan), gen, full))
    for r in out:
        r["target_bytes"] = target
        r["full_peak_bytes"] = full.stats.peak_total_bytes
    return out


def _kvdirect_within(model: TransformerBridge, limit: int, context: int, most: int) -> Any:
    """KV-Direct at the largest budget (at most ``most``, prefill chunks of the same size) for
    which the planner finds an exact plan whose peak bound fits ``limit``; None if none does.
    Bounds grow with the budget, so a bisection finds it."""

    def plan(budget: int) -> Any:
        try:
            return KVDirect(
                budget, prefill_chunk=budget, memory_limit=limit, context=context
            ).resolved(model)
        except ValueError:
            return None

    low, high, best = 1, most, None
    while low <= high:
        mid = (low + high) // 2
        found = plan(mid)
        if found is None:
            high = mid - 1
        else:
            best, low = found, mid + 1
    return best


def _plan_name(policy: Any) -> str:
    if isinstance(policy, FullCache):
        return "full cache (everything fits)"
    stride = f", stride {policy.stride}" if policy.checkpoint == "stride" else ""
    return f"B={policy.budget}, {policy.checkpoint} checkpoints{stride}"


def _record(name: str, plan: str, gen: Any, full: Any) -> dict[str, Any]:
    return {
        "policy": name,
        "plan": plan,
        "peak_total_bytes": gen.stats.peak_total_bytes,
        "match": 100.0 * float((gen.tokens == full.tokens).float().mean()),
        "own_kl": float(kl_divergence(full.logits, gen.logits).mean()),
        "fits": True,
    }


def measure(
    model: TransformerBridge, sizes: Sizes, progress: bool, store: CellStore | None = None
) -> pd.DataFrame:
    """One row per (length, share, prompt, policy); cells found in ``store`` are read back."""
    longest = max(sizes.grid_lengths)
    prompts = prompt_set(model, sizes.grid_prompts, longest + 1)
    cells = [(n, f, p) for n in sizes.grid_lengths for f in sizes.fractions for p in prompts]
    records = []
    weights = ""
    for length, share, (label, ids) in tqdm(cells, desc="equal memory", disable=not progress):
        budget = max(1, round(share * length))
        key = None
        if store is not None:
            weights = weights or model_fingerprint(model)
            key = store.key({"weights": weights, "device": str(ids.device), "ids": ids[:, :length],
                             "budget": budget, "new": sizes.grid_tokens,
                             "threads": torch.get_num_threads(), "torch": torch.__version__,
                             "transformers": transformers.__version__})  # fmt: skip
        done = None if store is None or key is None else store.get(key)
        if done is None:
            t0 = time.perf_counter()
            done = _cell(model, ids[:, :length], budget, sizes.grid_tokens)
            if store is not None and key is not None:
                store.put(key, done, time.perf_counter() - t0)
        for r in done:
            records.append(
                {"length": length, "share": share, "budget": budget, "prompt": label, **r}
            )
    return pd.DataFrame(records)


def _figure(name: str, table: pd.DataFrame) -> go.Figure:
    policies = [*BASELINES, "kvdirect"]
    mean = table.groupby(["policy", "length", "share"], as_index=False)["match"].mean()
    fig = make_subplots(rows=1, cols=len(policies), subplot_titles=policies, shared_yaxes=True)
    for col, policy in enumerate(policies, start=1):
        grid = mean[mean["policy"] == policy].pivot(index="length", columns="share", values="match")
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(),
                x=[f"{100 * s:.0f}%" for s in grid.columns],
                y=[str(n) for n in grid.index],
                colorscale="Blues",
                zmin=0,
                zmax=100,
                texttemplate="%{z:.0f}",
                showscale=col == len(policies),
            ),
            row=1,
            col=col,
        )
    fig.update_xaxes(title_text="budget / prompt", type="category")
    fig.update_yaxes(title_text="prompt tokens", type="category", col=1)
    fig.update_layout(
        title=f"{name}: token match (%) at equal total memory, chunked prefill "
        "(KV-Direct blank where no exact plan fits)",
        height=380,
    )
    return fig


def rows_for(name: str, table: pd.DataFrame, sizes: Sizes) -> list[Row]:
    rows = []
    base = table[table["policy"].isin(BASELINES)]
    cells = base.groupby(["policy", "length", "share"])["match"].mean().reset_index()
    for share in sizes.fractions:
        mine = cells[cells["share"] == share]
        n_in = int(((mine["match"] >= 5) & (mine["match"] <= 28)).sum())
        ok = n_in == len(mine)
        by_length = "; ".join(
            f"{n}: {int(((g['match'] >= 5) & (g['match'] <= 28)).sum())}/{len(g)}"
            for n, g in mine.groupby("length")
        )
        rows.append(
            Row(
                name,
                f"eviction baselines' token match, budget {100 * share:.0f}% of the prompt, "
                f"prompts of {min(sizes.grid_lengths)}-{max(sizes.grid_lengths)} tokens, "
                "chunked prefill",
                "5-28%",
                f"{mine['match'].min():.0f}-{mine['match'].max():.0f}%; {n_in} of {len(mine)} "
                "cells inside",
                judge(ok),
                "" if ok else f"{MEASURED}cells inside 5-28% per prompt length: {by_length}",
                rule="every baseline cell's mean inside 5-28%",
                source=f"{ABSTRACT}; {caption('4')}",
            )
        )
        kvd = table[(table["policy"] == "kvdirect") & (table["share"] == share)]
        fits = kvd[kvd["fits"]]
        exact = bool(len(fits)) and bool((fits["match"] == 100.0).all())
        missing = sorted(set(kvd.loc[~kvd["fits"], "length"]))
        found = "fits at no length"
        if len(fits):
            found = (
                f"fits at {len(fits)} of {len(kvd)} runs ({', '.join(sorted(set(fits['plan'])))}), "
                f"token match {fits['match'].min():.0f}% there"
            )
        if missing:
            found += f"; no exact plan fits at {missing} tokens"
        why = ""
        if missing:
            why = f"{MEASURED}no exact plan fits the baselines' memory at {missing} tokens"
        elif not exact:
            why = f"{MEASURED}token match {fits['match'].min():.0f}% where it fits"
        rows.append(
            Row(
                name,
                f"KV-Direct at the baselines' peak total memory, budget {100 * share:.0f}% of "
                "the prompt",
                "100% token match at every cache budget",
                found,
                judge(exact and not missing),
                why,
                rule="an exact plan fits every cell and matches the full cache's tokens there",
                source=ABSTRACT,
            )
        )
    return rows


def run(
    models: dict[str, TransformerBridge], sizes: Sizes, progress: bool, cells: Path | None = None
) -> ClaimResult:
    rows, figures, data = [], [], {}
    store = None if cells is None else CellStore(cells)
    for name, model in models.items():
        table = measure(model, sizes, progress, store)
        rows += rows_for(name, table, sizes)
        figures.append(_figure(name, table).to_json())
        data[name] = table.to_dict("records")
    return ClaimResult("fractions", TITLE, rows, figures, data, settings=settings_of(sizes))
