"""Abstract: decoding with no cache at all, recomputing from scratch, is token-identical."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
import torch
from transformer_lens.model_bridge import TransformerBridge

from residkit.generation import generate
from residkit.reproduction.base import (
    ABSTRACT,
    MEASURED,
    ClaimResult,
    Row,
    Sizes,
    judge,
    settings_of,
)
from residkit.reproduction.prompts import TASK_FAMILIES

TITLE = "Greedy decoding with no cache is token-identical to the full cache (abstract)"


def run(models: dict[str, TransformerBridge], sizes: Sizes, progress: bool) -> ClaimResult:
    rows, figures, data = [], [], {}
    n = sizes.nocache_tokens
    for name, model in models.items():
        prompt = TASK_FAMILIES["prose"]
        kw: dict[str, Any] = {"max_new_tokens": n, "return_logits": True, "stop_at_eos": False}
        full = generate(model, prompt, policy="full", **kw)
        none = generate(model, prompt, policy="none", **kw)
        assert full.logits is not None and none.logits is not None
        same = torch.equal(full.tokens, none.tokens)
        gap = (full.logits - none.logits).abs().amax(-1)
        why = ""
        if not same:
            step = int((full.tokens != none.tokens).nonzero()[0])
            top2 = full.logits[step].topk(2).values
            why = (
                f"{MEASURED}the first different token is at step {step}, where the full cache's "
                f"top two logits were {float(top2[0] - top2[1]):.2g} apart and the two runs' "
                f"logits {float(gap[step]):.2g}"
            )
        rows.append(
            Row(
                name,
                f"greedy tokens, no cache vs full cache ({n} tokens)",
                "token-identical",
                f"{int((full.tokens == none.tokens).sum())}/{n} equal; logits differ by at most "
                f"{float(gap.max()):.2g} (other GEMM shapes, so not bitwise)",
                judge(same),
                why,
                rule="every greedy token equal",
                source=ABSTRACT,
            )
        )
        fig = go.Figure(go.Bar(x=list(range(n)), y=gap.tolist()))
        fig.update_layout(
            title=f"{name}: max |logit difference|, no cache vs full cache, per step",
            xaxis_title="decoding step",
            yaxis_title="max |dlogit|",
        )
        figures.append(fig.to_json())
        data[name] = [{"step": i, "max_abs_dlogit": float(g)} for i, g in enumerate(gap)]
    return ClaimResult("nocache", TITLE, rows, figures, data, settings=settings_of(sizes))
