"""Figure 3a/3b: a multi-turn conversation, memory and latency per turn, full cache vs KV-Direct.

The conversation runs through the instruction-tuned model's chat template (`residkit.Chat`),
twenty turns of the same questions for every policy: the full cache, KV-Direct with layer
checkpoints (exact) and with token checkpoints. Memory is read from the tensors: between
forwards (active K/V and checkpoints with their spare rows, after each turn) and at the peak
(adding the K/V alive during a forward before the window is trimmed and whatever a recompute
holds while it runs). The paper's 42 MB and 103 MB do not say which of the two they are, nor the
model and dtype; both are reported.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import n_kv_heads
from residkit.generation import Chat
from residkit.policies import CachePolicy, FullCache, KVDirect
from residkit.reproduction.base import (
    ABSTRACT,
    HYPOTHESIS,
    MEASURED,
    NOT_APPLICABLE,
    SEED_ARTICLE,
    ClaimResult,
    Row,
    Sizes,
    caption,
    judge,
    settings_of,
)

TITLE = (
    "20 conversation turns: KV-Direct 42 MB vs the full cache's 103 MB, same latency (Fig. 3a/3b)"
)
MB = 1e6

QUESTIONS = (
    "What is a lighthouse for?",
    "Who looked after lighthouses before they were automated?",
    "How far can the light of a big lighthouse be seen?",
    "Why do lighthouses flash instead of shining steadily?",
    "What is a Fresnel lens?",
    "Which is the oldest lighthouse still standing?",
    "How did keepers keep the lamps burning in a storm?",
    "What replaced oil lamps in lighthouses?",
    "Are lighthouses still useful now that ships have GPS?",
    "What is a lightship?",
    "How are lighthouses painted so they can be recognised by day?",
    "What does a foghorn do?",
    "Can you name a famous lighthouse in France?",
    "And one in the United States?",
    "What is the tallest lighthouse in the world?",
    "How do you climb to the top of a lighthouse?",
    "What did a keeper write in the logbook?",
    "Why were many lighthouses built on rocks far out at sea?",
    "Summarise what we discussed in one sentence.",
    "Thank you. Goodbye!",
)


def _policies(budget: int) -> dict[str, CachePolicy]:
    return {
        "full cache": FullCache(),
        f"KV-Direct layer checkpoints (B={budget})": KVDirect(budget),
        f"KV-Direct token checkpoints (B={budget})": KVDirect(budget, "token", "fast"),
    }


def _figure(name: str, turns: dict[str, list[dict[str, Any]]]) -> go.Figure:
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("memory after each turn (MB)", "latency per turn (s)"),
    )
    for label, table in turns.items():
        x = [t["turn"] + 1 for t in table]
        fig.add_scatter(
            x=x, y=[t["total_bytes"] / MB for t in table], name=f"{label}: total", row=1, col=1
        )
        if "KV-Direct" in label:
            fig.add_scatter(
                x=x,
                y=[t["active_kv_bytes"] / MB for t in table],
                name=f"{label}: active K/V",
                line={"dash": "dot"},
                row=1,
                col=1,
            )
        fig.add_scatter(x=x, y=[t["seconds"] for t in table], name=label, row=1, col=2)
    fig.update_xaxes(title_text="turn")
    fig.update_layout(title=f"{name}: a conversation, full cache vs KV-Direct", height=450)
    return fig


def _first_difference(replies: list[str], reference: list[str]) -> int:
    return next(i for i, (a, b) in enumerate(zip(replies, reference, strict=True)) if a != b)


def run(models: dict[str, TransformerBridge], sizes: Sizes, progress: bool) -> ClaimResult:
    rows, figures, data = [], [], {}
    for name, model in models.items():
        if not getattr(model.tokenizer, "chat_template", None):
            rows.append(
                Row(
                    name,
                    "conversation memory and latency",
                    "(Fig. 3a/3b)",
                    "not run",
                    NOT_APPLICABLE,
                    "a base model without a chat template; the claim is about chat",
                )
            )
            continue
        turns: dict[str, list[dict[str, Any]]] = {}
        replies: dict[str, list[str]] = {}
        for label, policy in _policies(sizes.chat_budget).items():
            chat = Chat(model, policy)
            replies[label] = [
                chat.send(q, max_new_tokens=sizes.chat_tokens)
                for q in tqdm(
                    QUESTIONS[: sizes.chat_turns], desc=f"{name}: {label}", disable=not progress
                )
            ]
            turns[label] = chat.table.to_dict("records")
        labels = list(turns)
        n = len(turns[labels[0]])
        reference = replies[labels[0]]
        differing = [
            f"{label} from turn {_first_difference(r, reference) + 1}"
            for label, r in replies.items()
            if r != reference
        ]
        rows.append(
            Row(
                name,
                f"replies over {n} turns, every policy",
                "identical output under greedy decoding",
                "identical" if not differing else "differ: " + "; ".join(differing),
                judge(not differing),
                ""
                if not differing
                else f"{MEASURED}the replies of "
                + "; ".join(differing)
                + " differ (token checkpoints run in fast mode: one recompute shape, not the "
                "original chunks)",
                rule="every policy's replies equal the full cache's, turn by turn",
                source=SEED_ARTICLE,
            )
        )
        peak = {k: max(t["peak_total_bytes"] for t in v) / MB for k, v in turns.items()}
        held = {k: v[-1]["total_bytes"] / MB for k, v in turns.items()}
        full_label = labels[0]
        for label in labels[1:]:
            below = peak[label] < peak[full_label]
            rows.append(
                Row(
                    name,
                    f"memory over {n} turns, {label} vs the full cache: peak total (active K/V "
                    "during a forward + checkpoints + recompute transients) and between forwards "
                    "after the last turn, float32",
                    "42 MB peak for KV-Direct against 103 MB for the full cache (model and dtype "
                    "not stated)",
                    f"peak {peak[label]:.2f} MB vs {peak[full_label]:.2f} MB; between forwards "
                    f"{held[label]:.2f} MB vs {held[full_label]:.2f} MB",
                    judge(below),
                    ""
                    if below
                    else f"{MEASURED}peak {peak[label]:.2f} MB against the full cache's "
                    f"{peak[full_label]:.2f} MB"
                    + (
                        ": layer checkpoints keep a residual per layer per token "
                        f"({model.cfg.d_model} values) for K/V of "
                        f"{2 * n_kv_heads(model) * model.cfg.d_head}"
                        if "layer" in label
                        else ""
                    ),
                    rule="peak total below the full cache's peak",
                    source=f"{ABSTRACT}; {caption('3a')}",
                )
            )
        mean = {k: sum(t["seconds"] for t in v) / len(v) for k, v in turns.items()}
        ratio = mean[labels[1]] / mean[full_label]
        token_ratio = mean[labels[2]] / mean[full_label]
        rows.append(
            Row(
                name,
                "latency per turn, KV-Direct / full cache",
                "the same (no penalty)",
                f"layer checkpoints {ratio:.2f}x, token checkpoints {token_ratio:.2f}x (CPU)",
                judge(ratio < 1.1),
                ""
                if ratio < 1.1
                else f"{HYPOTHESIS}CPU: recomputing the evicted K/V at every step costs GEMMs the "
                "full cache does not run; the paper's GPU hides them behind memory-bound decoding",
                rule="layer checkpoints' mean time per turn below 1.1x the full cache's",
                source=caption("3b"),
            )
        )
        figures.append(_figure(name, turns).to_json())
        data[name] = [{"policy": k, **t} for k, v in turns.items() for t in v]
    return ClaimResult("chat", TITLE, rows, figures, data, settings=settings_of(sizes))
