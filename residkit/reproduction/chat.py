"""Figure 3a/3b: a multi-turn conversation, memory and latency per turn, full cache vs KV-Direct.

The conversation runs through the instruction-tuned model's chat template (`residkit.Chat`),
twenty turns of the same questions for every policy: the full cache, KV-Direct with layer
checkpoints (exact) and with token checkpoints. Memory is read from the tensors after every
turn (active K/V, checkpoints with their spare rows, and the total).
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from residkit.generation import Chat
from residkit.policies import CachePolicy, FullCache, KVDirect
from residkit.reproduction.base import (
    DIFFERS,
    NOT_APPLICABLE,
    REPRODUCED,
    ClaimResult,
    Row,
    Sizes,
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
        full, layer = (turns[k] for k in list(turns)[:2])
        same = all(r == replies["full cache"] for r in replies.values())
        n = len(full)
        rows.append(
            Row(
                name,
                f"replies over {n} turns, every policy",
                "KV-Direct's match the full cache's",
                "identical" if same else "differ",
                REPRODUCED if same else DIFFERS,
                "" if same else "fast token checkpoints changed a near-tie",
            )
        )
        peak = {k: max(t["total_bytes"] for t in v) / MB for k, v in turns.items()}
        full_peak, layer_peak, token_peak = peak.values()
        rows.append(
            Row(
                name,
                f"memory after turn {n}: total (active K/V + checkpoints, float32)",
                "42 MB for KV-Direct against 103 MB for the full cache (Gemma 3-4B, bf16)",
                f"full cache {full_peak:.1f} MB; layer checkpoints {layer_peak:.1f} MB "
                f"(active K/V {layer[-1]['active_kv_bytes'] / MB:.1f} MB); token checkpoints "
                f"{token_peak:.2f} MB",
                REPRODUCED if layer_peak < full_peak else DIFFERS,
                ""
                if layer_peak < full_peak
                else "accounting: layer checkpoints keep a residual per layer per token (576 values "
                "on SmolLM2) for K/V of 384; only token checkpoints stay below the full cache",
            )
        )
        mean = {k: sum(t["seconds"] for t in v) / len(v) for k, v in turns.items()}
        ratio = mean[list(mean)[1]] / mean["full cache"]
        token_ratio = mean[list(mean)[2]] / mean["full cache"]
        rows.append(
            Row(
                name,
                "latency per turn, KV-Direct / full cache",
                "the same (no penalty)",
                f"layer checkpoints {ratio:.2f}x, token checkpoints {token_ratio:.2f}x (CPU)",
                REPRODUCED if ratio < 1.1 else DIFFERS,
                ""
                if ratio < 1.1
                else "CPU: recomputing the evicted K/V at every step costs GEMMs the full cache "
                "does not run; the paper's GPU hides them behind memory-bound decoding",
            )
        )
        figures.append(_figure(name, turns).to_json())
        data[name] = [{"policy": k, **t} for k, v in turns.items() for t in v]
    return ClaimResult("chat", TITLE, rows, figures, data, settings=settings_of(sizes))
