"""Multi-turn chat on one cache session: state carries across turns, memory is reported per turn."""

from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from transformer_lens.model_bridge import TransformerBridge

from residkit._compat import check_bridge_writes_cache
from residkit.generation.engine import Sampler, decode_loop, resolve_policy
from residkit.policies import CachePolicy

__all__ = ["Chat", "TurnMemory"]


@dataclass
class TurnMemory:
    """Bytes held by the session after one turn."""

    turn: int
    tokens_total: int
    active_kv_bytes: int
    checkpoint_bytes: int
    peak_active_kv_bytes: int
    peak_transient_bytes: int


class Chat:
    """A conversation whose K/V state lives in one policy session.

    Each :meth:`send` feeds the user's text (and the previous reply's last token, which decoding
    never feeds back) as one chunk, then decodes the reply. With ``KVDirect`` the active K/V stay
    within the budget across turns; :meth:`memory` shows what each turn held.

    Args:
        model: A bridge from :func:`residkit.load`.
        policy: A :class:`~residkit.policies.CachePolicy` or ``"full"`` / ``"none"``.

    Example:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> chat = Chat(model, residkit.KVDirect(budget=8))
        >>> reply = chat.send("Hello!", max_new_tokens=4)
        >>> reply = chat.send("And again?", max_new_tokens=4)
        >>> len(chat.memory()), int(chat.memory().iloc[-1]["active_kv_bytes"]) <= 8 * 4 * 2 * 2 * 16 * 4
        (2, True)
    """

    def __init__(self, model: TransformerBridge, policy: CachePolicy | str = "full") -> None:
        self.model = model
        self.policy = resolve_policy(policy)
        check_bridge_writes_cache(model)
        self.session = self.policy.open(model)
        self.history: list[torch.Tensor] = []
        self._pending: torch.Tensor | None = None
        self._turns: list[TurnMemory] = []
        self._sampler = Sampler()

    @torch.no_grad()
    def send(self, text: str, max_new_tokens: int = 32, *, stop_at_eos: bool = False) -> str:
        """Feed ``text``, decode up to ``max_new_tokens`` tokens, return the reply text."""
        if not text:
            raise ValueError("empty message")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        first = not self.history
        ids = self.model.to_tokens(text, prepend_bos=None if first else False)
        if self._pending is not None:
            ids = torch.cat([self._pending.view(1, 1).to(ids), ids], dim=1)
        total = sum(t.numel() for t in self.history) + ids.shape[1] + max_new_tokens
        if total > self.model.cfg.n_ctx:
            raise ValueError(
                f"this turn would bring the conversation to {total} tokens, beyond the model's "
                f"context of {self.model.cfg.n_ctx}"
            )
        logits = self.session.prefill(ids)
        eos = getattr(self.model.tokenizer, "eos_token_id", None) if stop_at_eos else None
        new, _ = decode_loop(self.session, logits, max_new_tokens, self._sampler, eos)
        reply = torch.stack(new)
        self.history += [ids[0], reply[:-1]]
        self._pending = reply[-1]
        mem = self.session.memory
        self._turns.append(
            TurnMemory(
                turn=len(self._turns),
                tokens_total=sum(t.numel() for t in self.history),
                active_kv_bytes=mem.active_kv_bytes,
                checkpoint_bytes=mem.checkpoint_bytes,
                peak_active_kv_bytes=mem.peak_active_kv_bytes,
                peak_transient_bytes=mem.peak_transient_bytes,
            )
        )
        return self.model.tokenizer.decode(reply.tolist()) if self.model.tokenizer else ""

    def memory(self) -> pd.DataFrame:
        """One row per turn: tokens so far, active K/V bytes and checkpoint bytes after it."""
        return pd.DataFrame([vars(t) for t in self._turns])

    def figure(self) -> go.Figure:
        """Active K/V and checkpoint bytes after each turn."""
        df = self.memory()
        fig = go.Figure()
        fig.add_scatter(
            x=df["turn"], y=df["active_kv_bytes"], name="active K/V", mode="lines+markers"
        )
        fig.add_scatter(
            x=df["turn"], y=df["checkpoint_bytes"], name="checkpoints", mode="lines+markers"
        )
        fig.update_layout(
            title=f"Chat memory per turn: {self.policy!r}", xaxis_title="turn", yaxis_title="bytes"
        )
        return fig

    def close(self) -> None:
        """Release the session (removes nothing from the model: sessions add hooks per forward)."""
        self.session.close()
