"""The decoding loop. Policies decide what is kept; this loop decides what is generated.

Every policy is driven the same way: ``prefill(prompt)``, then ``step(token)`` per new token,
with the same sampler. So any difference in output between two policies is a difference in
what attention saw, never in how tokens were chosen.
"""

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import generation_config
from residkit._bridge.contract import check_contract
from residkit._entry import entry
from residkit._validate import non_negative_int, positive_int, real
from residkit.capture import Inputs, to_tokens
from residkit.policies import CachePolicy, CacheSession, FullCache, KVDirect, MemoryStats, NoCache
from residkit.policies.kvdirect import Checkpoint, Mode

__all__ = [
    "Generation",
    "GenerationStats",
    "Sampler",
    "decode_loop",
    "eos_ids",
    "generate",
    "generate_kvdirect",
    "resolve_policy",
    "sample_next",
]

_NAMED = {"full": FullCache, "none": NoCache}


def resolve_policy(policy: CachePolicy | str) -> CachePolicy:
    """A policy object from itself or its name (``"full"``, ``"none"``)."""
    if isinstance(policy, CachePolicy):
        return policy
    if isinstance(policy, str) and policy in _NAMED:
        return _NAMED[policy]()
    raise ValueError(
        f"unknown cache policy {policy!r}; pass a CachePolicy object or one of {sorted(_NAMED)}"
    )


@dataclass
class GenerationStats(MemoryStats):
    """Memory (from the session) plus timing of one generation."""

    total_seconds: float = 0.0
    new_tokens: int = 0
    max_logit_deviation: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds > 0 else float("nan")


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

    def figure(self) -> go.Figure:
        """Bytes held after each forward: active K/V and checkpoints."""
        steps = list(range(len(self.stats.per_step)))
        fig = go.Figure()
        fig.add_scatter(x=steps, y=[a for a, _ in self.stats.per_step], name="active K/V")
        fig.add_scatter(x=steps, y=[c for _, c in self.stats.per_step], name="checkpoints")
        fig.update_layout(
            title=f"Memory per step: {self.policy!r}",
            xaxis_title="forward (0 = prefill)",
            yaxis_title="bytes",
        )
        return fig


def sample_next(
    logits: Float[Tensor, "1 vocab"],
    *,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Int[Tensor, "1 1"]:
    """Greedy argmax, or a sample after temperature, top-k and top-p (nucleus) filtering."""
    if not do_sample:
        return logits.argmax(-1, keepdim=True)
    scores = logits.double() / temperature
    if top_k is not None:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, -1) >= top_p  # keep the token that crosses p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, -1)
    return torch.multinomial(probs, 1, generator=generator)


@dataclass
class Sampler:
    """How the next token is chosen (shared by :func:`generate` and :class:`Chat`)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        return sample_next(
            logits,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            generator=self.generator,
        )


def eos_ids(model: TransformerBridge) -> set[int]:
    """Token ids that end generation: the tokenizer's EOS and the generation config's, as HF's
    ``generate`` stops on the latter (Gemma lists several)."""
    ids: set[int] = set()
    tok_eos = getattr(model.tokenizer, "eos_token_id", None)
    for e in (tok_eos, getattr(generation_config(model), "eos_token_id", None)):
        ids.update([e] if isinstance(e, int) else list(e or []))
    return ids


def decode_loop(
    session: CacheSession,
    logits: Tensor | None,
    max_new_tokens: int,
    sampler: Sampler,
    eos: set[int] | None,
    return_logits: bool = False,
    forced_tokens: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Choose ``max_new_tokens`` tokens starting from ``logits``; the last one is not fed back."""
    new: list[Tensor] = []
    kept: list[Tensor] = []
    for i in range(max_new_tokens):
        assert logits is not None
        if return_logits:
            kept.append(logits[0].detach().clone())
        nxt = sampler(logits)
        if forced_tokens is not None:
            nxt = forced_tokens[i].view(1, 1).to(nxt)
        new.append(nxt[0, 0])
        if (eos is not None and int(nxt) in eos) or i == max_new_tokens - 1:
            break
        logits = session.step(nxt)
    return new, kept


@entry
def generate_kvdirect(
    model: TransformerBridge,
    prompt: Inputs,
    *,
    max_new_tokens: int = 32,
    budget: int = 64,
    checkpoint: Checkpoint = "layer",
    mode: Mode = "exact",
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    return_logits: bool = False,
    measure_deviation: bool = False,
    prefill_chunk: int | None = None,
) -> Generation:
    """Decode with KV-Direct: :func:`generate` with ``policy=KVDirect(budget, checkpoint, mode,
    measure_deviation=..., prefill_chunk=...)``.

    See :class:`residkit.policies.KVDirect` for the mechanism, the memory accounting and what
    happens to user hooks; :func:`generate` for the other arguments.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:gemma3")
        >>> gen = residkit.generate_kvdirect(model, "The residual", max_new_tokens=8, budget=4)
        >>> gen.stats.tokens_evicted > 0
        True
    """
    return generate(
        model,
        prompt,
        max_new_tokens=max_new_tokens,
        policy=KVDirect(
            budget,
            checkpoint,
            mode,
            measure_deviation=measure_deviation,
            prefill_chunk=prefill_chunk,
        ),
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_at_eos=stop_at_eos,
        return_logits=return_logits,
    )


def check_sampling(
    do_sample: Any, temperature: Any, top_k: Any, top_p: Any, seed: Any = None
) -> None:
    """Check the sampling arguments: TypeError / ValueError naming the one that is wrong.

    ``temperature``, ``top_k`` and ``top_p`` are ignored when ``do_sample`` is False, but
    still must be of the right type (a typo should not pass silently).
    """
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be True or False, got {do_sample!r}")
    temperature = real("temperature", temperature)
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if top_k is not None:
        positive_int("top_k", top_k)
    if top_p is not None and not 0 < real("top_p", top_p) <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None:
        non_negative_int("seed", seed)


@entry
@torch.no_grad()
def generate(
    model: TransformerBridge,
    prompt: Inputs,
    *,
    max_new_tokens: int = 32,
    policy: CachePolicy | str = "full",
    cache: CachePolicy | str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    return_logits: bool = False,
    forced_tokens: Int[Tensor, " new"] | None = None,
) -> Generation:
    """Decode ``max_new_tokens`` tokens from ``prompt`` under a cache policy.

    Args:
        model: A bridge from :func:`residkit.load`.
        prompt: One prompt (string or token ids).
        max_new_tokens: How many tokens to generate (fewer if EOS and ``stop_at_eos``).
        policy: A :class:`~residkit.policies.CachePolicy` or ``"full"`` / ``"none"``.
        cache: Deprecated name of ``policy`` (a DeprecationWarning; removed in 0.3).
        do_sample: Sample instead of greedy argmax.
        temperature: Sampling temperature (ignored when greedy).
        top_k: Sample among the ``top_k`` most likely tokens only (ignored when greedy).
        top_p: Sample within the smallest set of probability ``top_p`` (ignored when greedy).
        seed: Seed of the sampler's own ``torch.Generator`` (same seed, same draws, whatever
            the policy).
        stop_at_eos: Stop after the tokenizer's EOS token.
        return_logits: Keep the ``[new, vocab]`` logits each token was chosen from.
        forced_tokens: Teacher forcing: feed these tokens instead of the chosen ones (the
            logits are still those the policy produced). Used to compare distributions.

    Returns:
        A :class:`Generation`.

    Raises:
        TypeError: not a model, a prompt of the wrong type, a count or sampling argument of
            the wrong type.
        ValueError: bad sampling arguments, unknown policy, empty prompt, or a prompt plus
            ``max_new_tokens`` longer than the model's context.
        BridgeContractError: the installed transformers / TransformerLens pair breaks an
            assumption residkit relies on (:mod:`residkit._bridge.contract` names it).

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:gpt2")
        >>> a = residkit.generate(model, "Once upon", max_new_tokens=8, policy="none")
        >>> b = residkit.generate(model, "Once upon", max_new_tokens=8, policy="full")
        >>> torch.equal(a.tokens, b.tokens)
        True
    """
    non_negative_int("max_new_tokens", max_new_tokens)
    check_sampling(do_sample, temperature, top_k, top_p, seed)
    if cache is not None:
        warnings.warn(
            "generate(cache=...) is deprecated; pass policy=... instead",
            DeprecationWarning,
            stacklevel=2,
        )
        if policy != "full":
            raise ValueError(
                f"pass one of policy= and cache=, not both (got policy={policy!r}, cache={cache!r})"
            )
        policy = cache
    chosen = resolve_policy(policy)
    tokens = to_tokens(model, prompt, extra=max_new_tokens)
    if tokens.shape[0] != 1:
        raise ValueError(f"generate takes one prompt, got a batch of {tokens.shape[0]}")
    if forced_tokens is not None:
        forced_tokens = to_tokens(model, forced_tokens)[0]
    if forced_tokens is not None and len(forced_tokens) < max_new_tokens:
        raise ValueError(
            f"forced_tokens has {len(forced_tokens)} tokens but max_new_tokens={max_new_tokens}"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
    eos = eos_ids(model) if stop_at_eos else None
    sampler = Sampler(do_sample, temperature, top_k, top_p, generator)

    check_contract(model)
    start = time.perf_counter()
    session = chosen.open(model)
    try:
        logits = session.prefill(tokens) if max_new_tokens > 0 else None
        new, kept_logits = decode_loop(
            session, logits, max_new_tokens, sampler, eos, return_logits, forced_tokens
        )
    finally:
        session.close()
    elapsed = time.perf_counter() - start

    stats = GenerationStats(**vars(session.memory))
    stats.total_seconds, stats.new_tokens = elapsed, len(new)
    stats.max_logit_deviation = getattr(session, "max_logit_deviation", None)
    out = torch.stack(new) if new else torch.zeros(0, dtype=torch.long)
    return Generation(
        prompt_tokens=tokens[0],
        tokens=out,
        text=model.tokenizer.decode(out.tolist()) if model.tokenizer is not None else "",
        policy=chosen,
        stats=stats,
        logits=torch.stack(kept_logits) if return_logits and kept_logits else None,
        token_strs=[model.tokenizer.decode([t]) for t in out.tolist()] if model.tokenizer else [],
    )
