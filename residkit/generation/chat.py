"""Multi-turn chat on one policy cache: state carries across turns, memory is reported per turn."""

import secrets
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import attached
from residkit._bridge.contract import check_contract
from residkit._entry import check_model, exclusive
from residkit._validate import positive_int
from residkit.generation.engine import decode_loop, eos_ids, next_logits, prefill
from residkit.generation.sampling import Sampler
from residkit.policies import CachePolicy, resolve_policy

__all__ = ["Chat", "TurnMemory"]

# Stands in for the last reply while the template renders the next turn: what follows it is
# what the cache has not seen yet. No template trims or escapes it.
_MARK = "\x00residkit-reply\x00"


@dataclass
class TurnMemory:
    """Bytes held by the cache after one turn, and the turn's time.

    ``total_bytes`` (active K/V + reserved checkpoints) is what a reader compares with the full
    cache's K/V; ``peak_total_bytes`` adds what was alive during the turn's forwards (see
    :class:`~residkit.policies.MemoryStats`).
    """

    turn: int
    tokens_fed: int
    tokens_generated: int
    tokens_total: int
    seconds: float
    active_kv_bytes: int
    checkpoint_bytes: int
    checkpoint_reserved_bytes: int
    total_bytes: int
    peak_active_kv_bytes: int
    peak_transient_bytes: int
    peak_total_bytes: int


class Chat:
    """A conversation whose K/V state lives in one policy cache.

    Each :meth:`send` feeds only what the cache has not seen (the user's turn, wrapped by the
    tokenizer's chat template when it has one, plus the previous reply's last token, which
    decoding never feeds back), then decodes the reply. The first turn's tokens are exactly
    ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``, so the first reply
    is HF ``generate``'s, token for token. Later turns keep the tokens the model generated
    (HF would re-tokenise the decoded reply text; the two can differ where a reply's text
    tokenises another way). With ``KVDirect`` the active K/V stay within the budget across
    turns; :meth:`memory` shows what each turn held and how long it took.

    Args:
        model: A bridge from :func:`residkit.load`.
        policy: A :class:`~residkit.policies.CachePolicy` or ``"full"`` / ``"none"``.
        chat_template: Wrap turns in the tokenizer's chat template. Default: when the
            tokenizer has one (instruction-tuned models).
        system: A system message for templated chats (the template's default otherwise).

    Raises:
        ValueError: ``chat_template=True`` but the tokenizer has no chat template.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> chat = Chat(model, residkit.KVDirect(budget=8))
        >>> reply = chat.send("Hello!", max_new_tokens=4)
        >>> reply = chat.send("And again?", max_new_tokens=4)
        >>> last = chat.table.iloc[-1]
        >>> len(chat.table), int(last["active_kv_bytes"]) <= 8 * 4 * 2 * 2 * 16 * 4
        (2, True)
    """

    def __init__(
        self,
        model: TransformerBridge,
        policy: CachePolicy | str = "full",
        *,
        chat_template: bool | None = None,
        system: str | None = None,
    ) -> None:
        check_model(model)
        has_template = bool(getattr(model.tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise ValueError(
                "chat_template=True but this model's tokenizer has no chat template; "
                "pass chat_template=False to feed turns as plain text"
            )
        self.model = model
        self.policy = resolve_policy(policy)
        self.templated = has_template if chat_template is None else chat_template
        with exclusive(model):
            check_contract(model)
        self.cache = self.policy.make_cache(model)
        self.messages: list[dict[str, str]] = (
            [{"role": "system", "content": system}] if system is not None else []
        )
        self.history: list[Tensor] = []
        self.replies: list[Tensor] = []  # each turn's generated ids, its EOS included
        self._pending: Tensor | None = None
        self._stopped_at_eos = False
        self._turns: list[TurnMemory] = []
        self._sampler = Sampler()
        self._lock = threading.RLock()  # one turn at a time, whatever the threads

    def __repr__(self) -> str:
        fed = sum(t.numel() for t in self.history)
        return f"Chat({self.policy!r}, {len(self._turns)} turns, {fed} tokens fed; .table)"

    def _template_ids(self, text: str) -> list[int]:
        tok: Any = self.model.tokenizer
        messages = [*self.messages, {"role": "user", "content": text}]
        if not self.history:
            return list(tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
        # The last assistant message becomes a marker: the text after it is new to the cache.
        # The marker is one no message contains (a user may paste anything, this too).
        mark = _MARK
        while any(mark in m["content"] for m in messages):
            mark = f"{_MARK}{secrets.token_hex(8)}\x00"
        messages[-2] = {"role": "assistant", "content": mark}
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        delta = rendered[rendered.index(mark) + len(mark) :]
        return list(tok(delta, add_special_tokens=False)["input_ids"])

    def _turn_ids(self, text: str) -> Tensor:
        """What this turn feeds: the previous reply's last token (never fed yet), then the text
        (wrapped by the chat template when the chat has one)."""
        if self.templated:
            ids = self._template_ids(text)
            pending = self._pending
            if self._stopped_at_eos and ids and pending is not None and ids[0] == int(pending):
                pending = None  # the reply's EOS is the template's own end of turn
        else:
            plain = self.model.to_tokens(text, prepend_bos=None if not self.history else False)
            ids, pending = plain[0].tolist(), self._pending
        head = [int(pending)] if pending is not None else []
        return torch.tensor([head + ids], device=self.model.cfg.device)

    @torch.no_grad()
    def send(self, text: str, max_new_tokens: int = 32, *, stop_at_eos: bool = True) -> str:
        """Feed ``text``, decode up to ``max_new_tokens`` tokens, return the reply text.

        Args:
            text: The user's message.
            max_new_tokens: Most tokens in the reply.
            stop_at_eos: End the reply at an end-of-turn / EOS token (the token is kept in the
                history, as the model produced it).

        A turn is atomic: if it fails or is interrupted (an exception, KeyboardInterrupt), the
        chat and its cache are left as they were before it.

        Raises:
            TypeError: a message that is not one string, or a non-int ``max_new_tokens``.
            ValueError: empty message, ``max_new_tokens < 1``, or a turn that would pass the
                model's context.
        """
        if not isinstance(text, str):
            raise TypeError(f"Chat.send takes one message (a str), got {text!r:.80}")
        if not text:
            raise ValueError("empty message")
        positive_int("max_new_tokens", max_new_tokens)
        if not isinstance(stop_at_eos, bool):
            raise TypeError(f"stop_at_eos must be True or False, got {stop_at_eos!r}")
        with self._lock:
            return self._send(text, max_new_tokens, stop_at_eos)

    def _send(self, text: str, max_new_tokens: int, stop_at_eos: bool) -> str:
        start = time.perf_counter()
        ids = self._turn_ids(text)
        total = sum(t.numel() for t in self.history) + ids.shape[1] + max_new_tokens
        if total > self.model.cfg.n_ctx:
            raise ValueError(
                f"this turn would bring the conversation to {total} tokens, beyond the model's "
                f"context of {self.model.cfg.n_ctx}"
            )
        eos = eos_ids(self.model) if stop_at_eos else None
        with exclusive(self.model), attached(self.cache) as cache:
            snapshot = cache.snapshot()
            try:
                logits = prefill(self.model, cache, ids, self.policy.prefill_chunk_size)
                new, _ = decode_loop(
                    lambda t: next_logits(self.model, t, cache),
                    logits,
                    max_new_tokens,
                    self._sampler,
                    eos,
                )
                # Everything the turn changes is computed before any of it is kept, so a
                # failure anywhere leaves the chat as it was, cache included.
                reply = torch.stack(new)[:, 0]
                tok: Any = self.model.tokenizer
                reply_text = tok.decode(reply.tolist(), skip_special_tokens=True) if tok else ""
                history = sum(t.numel() for t in self.history) + ids.shape[1] + len(new) - 1
                mem = self.cache.memory
                turn = TurnMemory(
                    turn=len(self._turns),
                    tokens_fed=ids.shape[1],
                    tokens_generated=len(new),
                    tokens_total=history,
                    seconds=time.perf_counter() - start,
                    active_kv_bytes=mem.active_kv_bytes,
                    checkpoint_bytes=mem.checkpoint_bytes,
                    checkpoint_reserved_bytes=mem.checkpoint_reserved_bytes,
                    total_bytes=mem.total_bytes,
                    peak_active_kv_bytes=mem.peak_active_kv_bytes,
                    peak_transient_bytes=mem.peak_transient_bytes,
                    peak_total_bytes=mem.peak_total_bytes,
                )
            except BaseException:
                cache.restore(snapshot)
                raise
        self.history += [ids[0], reply[:-1]]
        self.replies.append(reply)
        self._pending = reply[-1]
        self._stopped_at_eos = eos is not None and int(reply[-1]) in eos
        self.messages += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": reply_text},
        ]
        self._turns.append(turn)
        return reply_text

    def tokens(self) -> Tensor:
        """Every token the cache has been fed, in order (the last reply's last token excluded)."""
        if not self.history:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat(self.history)

    @property
    def table(self) -> pd.DataFrame:
        """One row per turn: tokens, seconds, and the bytes held after it (see :class:`TurnMemory`)."""
        columns = [f.name for f in fields(TurnMemory)]
        return pd.DataFrame([vars(t) for t in self._turns], columns=columns)

    def figure(self, *, title: str | None = None) -> go.Figure:
        """Active K/V and checkpoint bytes after each turn."""
        df = self.table
        fig = go.Figure()
        fig.add_scatter(
            x=df["turn"], y=df["active_kv_bytes"], name="active K/V", mode="lines+markers"
        )
        fig.add_scatter(
            x=df["turn"], y=df["checkpoint_bytes"], name="checkpoints", mode="lines+markers"
        )
        fig.update_layout(
            title=title or f"Chat memory per turn: {self.policy!r}",
            xaxis_title="turn",
            yaxis_title="bytes",
        )
        return fig

    def close(self) -> None:
        """Detach the cache from the model (it holds hooks only during :meth:`send` anyway)."""
        self.cache.detach()
