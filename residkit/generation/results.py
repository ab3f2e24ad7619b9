"""What :func:`residkit.generate` returns: one :class:`Generation` per prompt, and for a batch
of prompts a :class:`Generations` holding them with the batch's memory."""

from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from residkit.policies import CachePolicy, MemoryStats

__all__ = ["Generation", "GenerationStats", "Generations"]


@dataclass
class GenerationStats(MemoryStats):
    """Memory (from the cache) plus timing of one generation."""

    total_seconds: float = 0.0
    new_tokens: int = 0
    max_logit_deviation: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds > 0 else float("nan")

    def __repr__(self) -> str:
        mb = 1e6
        return (
            f"GenerationStats(peak total {self.peak_total_bytes / mb:.2f} MB, active K/V "
            f"{self.active_kv_bytes / mb:.2f} MB, checkpoints {self.checkpoint_bytes / mb:.2f} MB, "
            f"{self.new_tokens} tokens in {self.total_seconds:.2f} s)"
        )


@dataclass
class Generation:
    """The result of :func:`generate`.

    Attributes:
        prompt_tokens: ``[pos]`` ids of the prompt.
        tokens: ``[new]`` ids generated.
        text: The generated text (decoded new tokens).
        policy: The policy that was used.
        stats: Memory and timing.
        logits: ``[new, vocab]`` logits each new token was chosen from, if requested.

    Examples:
        >>> import residkit
        >>> gen = residkit.generate(residkit.load("zoo:llama"), "abc", max_new_tokens=3, stop_at_eos=False)
        >>> gen.tokens.shape, gen.stats.peak_active_kv_bytes > 0
        (torch.Size([3]), True)
    """

    prompt_tokens: Int[Tensor, " pos"]
    tokens: Int[Tensor, " new"]
    text: str
    policy: CachePolicy
    stats: GenerationStats
    logits: Float[Tensor, "new vocab"] | None = None
    token_strs: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"Generation({len(self.tokens)} new tokens {self.text!r:.60}, policy={self.policy!r}, "
            f"peak {self.stats.peak_total_bytes / 1e6:.2f} MB; .table, .stats, .logits)"
        )

    @property
    def table(self) -> pd.DataFrame:
        """One row per new token: step, token id, token text, and its log-prob if logits kept."""
        df = pd.DataFrame(
            {
                "step": range(len(self.tokens)),
                "token": self.tokens.tolist(),
                "text": self.token_strs,
            }
        )
        if self.logits is not None:
            logp = torch.log_softmax(self.logits.double(), -1)
            df["logprob"] = logp.gather(1, self.tokens.view(-1, 1)).squeeze(1).tolist()
        return df

    def figure(self, *, title: str | None = None) -> go.Figure:
        """Bytes held after each forward: active K/V and checkpoints."""
        steps = list(range(len(self.stats.per_step)))
        fig = go.Figure()
        fig.add_scatter(x=steps, y=[a for a, _ in self.stats.per_step], name="active K/V")
        fig.add_scatter(x=steps, y=[c for _, c in self.stats.per_step], name="checkpoints")
        fig.update_layout(
            title=title or f"Memory per step: {self.policy!r}",
            xaxis_title="forward (0 = prefill)",
            yaxis_title="bytes",
        )
        return fig


@dataclass
class Generations:
    """The result of :func:`residkit.generate` on a batch of prompts: one :class:`Generation`
    per prompt (its own tokens, text and logits, up to its own EOS), decoded together.

    Attributes:
        rows: One :class:`Generation` per prompt, in order; each row's ``stats`` is the batch's.
        padding: Left-padding tokens of each row.
        stats: Memory and timing of the whole batch (``stats.batch_size`` rows; bytes per row
            in :meth:`MemoryStats.per_row`).

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> out = residkit.generate(model, ["abc", "a"], max_new_tokens=3, stop_at_eos=False)
        >>> len(out), out.padding, out[1].tokens.shape
        (2, [0, 2], torch.Size([3]))
    """

    rows: list[Generation]
    padding: list[int]
    policy: CachePolicy
    stats: GenerationStats

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Generation:
        return self.rows[index]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.rows)

    @property
    def texts(self) -> list[str]:
        """Each row's generated text."""
        return [row.text for row in self.rows]

    @property
    def table(self) -> pd.DataFrame:
        """One row per prompt: its tokens, padding, new tokens, the text, and bytes per row."""
        per_row = self.stats.per_row()
        return pd.DataFrame(
            {
                "row": range(len(self.rows)),
                "prompt_tokens": [len(r.prompt_tokens) for r in self.rows],
                "padding": self.padding,
                "new_tokens": [len(r.tokens) for r in self.rows],
                "text": self.texts,
                "peak_total_bytes": per_row["peak_total_bytes"],
            }
        )

    def figure(self, *, title: str | None = None) -> go.Figure:
        """New tokens per row, and the batch's bytes per row after each forward."""
        from plotly.subplots import make_subplots

        fig = make_subplots(
            rows=1, cols=2, subplot_titles=("new tokens per row", "bytes per row after a forward")
        )
        fig.add_bar(x=list(range(len(self.rows))), y=[len(r.tokens) for r in self.rows],
                    name="new tokens", row=1, col=1)  # fmt: skip
        rows = max(self.stats.batch_size, 1)
        steps = list(range(len(self.stats.per_step)))
        for i, label in ((0, "active K/V"), (1, "checkpoints")):
            fig.add_scatter(x=steps, y=[s[i] / rows for s in self.stats.per_step], name=label,
                            row=1, col=2)  # fmt: skip
        fig.update_layout(title=title or f"{len(self.rows)} prompts: {self.policy!r}")
        return fig
