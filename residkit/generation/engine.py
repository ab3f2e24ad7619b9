"""The decoding loop. Policies decide what is kept; this loop decides what is generated.

:func:`generate` is a plain loop over a policy's ``transformers`` cache
(:meth:`~residkit.policies.CachePolicy.make_cache`): the prompt in one forward (or chunks of
``policy.prefill_chunk``), then one forward per new token, each ``model(ids,
past_key_values=cache)`` with the unembedding at the last position only, as transformers'
``generate`` computes it. Tokens are chosen by transformers' own sampling warpers
(temperature, top-k, top-p) and ``torch.multinomial``. So the same cache handed to
transformers' ``generate`` gives the same logits, bit for bit, and with the same seed the same
samples; and any difference between two policies is a difference in what attention saw.
"""

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import cached_forward, generation_config, muted_hook_points, new_cache
from residkit._entry import entry
from residkit._validate import non_negative_int
from residkit.capture import Inputs, to_tokens
from residkit.generation.sampling import Sampler, check_sampling, sample_next
from residkit.policies import CachePolicy, KVDirect, MemoryStats, resolve_policy
from residkit.policies.base import chunked

__all__ = [
    "Generation",
    "GenerationStats",
    "Sampler",
    "decode_loop",
    "eos_ids",
    "generate",
    "generate_kvdirect",
    "next_logits",
    "prefill",
    "resolve_policy",
    "sample_next",
]


def next_logits(
    model: TransformerBridge, ids: Int[Tensor, "batch pos"], cache: Any
) -> Float[Tensor, "batch vocab"]:
    """Logits after ``ids``, fed through ``model`` with ``cache``: the unembedding runs at the
    last position only (transformers' ``generate`` does the same; a whole-sequence unembedding
    is another GEMM shape, different in the last bits)."""
    return cached_forward(model, ids, cache, logits_to_keep=1)[:, -1]


def prefill(
    model: TransformerBridge, cache: Any, tokens: Int[Tensor, "batch pos"], chunk: int | None
) -> Float[Tensor, "batch vocab"]:
    """Feed ``tokens`` in forwards of at most ``chunk`` positions; the last one's logits."""
    for piece in chunked(tokens, chunk):
        logits = next_logits(model, piece, cache)
    return logits


@dataclass
class GenerationStats(MemoryStats):
    """Memory (from the cache) plus timing of one generation."""

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


def eos_ids(model: TransformerBridge) -> set[int]:
    """Token ids that end generation: the tokenizer's EOS and the generation config's, as HF's
    ``generate`` stops on the latter (Gemma lists several)."""
    ids: set[int] = set()
    tok_eos = getattr(model.tokenizer, "eos_token_id", None)
    for e in (tok_eos, getattr(generation_config(model), "eos_token_id", None)):
        ids.update([e] if isinstance(e, int) else list(e or []))
    return ids


def decode_loop(
    step: Callable[[Tensor], Tensor],
    logits: Tensor | None,
    max_new_tokens: int,
    sampler: Sampler,
    eos: set[int] | None,
    return_logits: bool = False,
    forced_tokens: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Choose ``max_new_tokens`` tokens starting from ``logits``, feeding each chosen token to
    ``step`` (which returns the next logits); the last one is not fed back."""
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
        logits = step(nxt)
    return new, kept


_KVDIRECT_OPTIONS = {f.name for f in fields(KVDirect)} - {"budget"}


def generate_kvdirect(
    model: TransformerBridge, prompt: Inputs, *, budget: int = 64, **options: Any
) -> Generation:
    """Decode with KV-Direct: :func:`generate` with ``policy=KVDirect(budget, ...)``.

    Args:
        model: A bridge from :func:`residkit.load`.
        prompt: One prompt (string or token ids).
        budget: Tokens of K/V kept per global layer.
        **options: Any :class:`~residkit.policies.KVDirect` option (``checkpoint``, ``mode``,
            ``stride``, ``keep_top``, ``scope``, ``prefill_chunk``, ``memory_limit``,
            ``context``, ``measure_deviation``), and any argument of :func:`generate`.

    Raises:
        TypeError: an option neither :class:`~residkit.policies.KVDirect` nor
            :func:`generate` takes (the message names it), or ``policy=``.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:gemma3")
        >>> gen = residkit.generate_kvdirect(model, "The residual", max_new_tokens=8, budget=4,
        ...                                  checkpoint="stride", stride=2)
        >>> gen.stats.tokens_evicted > 0, gen.policy.stride
        (True, 2)
    """
    if "policy" in options:
        raise TypeError("generate_kvdirect decodes with KVDirect; pass its options, not policy=")
    kv = {k: options.pop(k) for k in list(options) if k in _KVDIRECT_OPTIONS}
    return generate(model, prompt, policy=KVDirect(budget, **kv), **options)


class _Shadow:
    """A full cache decoding the same ids beside a policy, user hooks muted: the max |logit
    difference| from it (``KVDirect(measure_deviation=True)``)."""

    def __init__(self, model: TransformerBridge) -> None:
        self.model, self.cache, self.max_deviation = model, new_cache(model), 0.0

    def compare(self, ids: Tensor, logits: Tensor) -> Tensor:
        with muted_hook_points(self.model):
            ref = next_logits(self.model, ids, self.cache)
        self.max_deviation = max(self.max_deviation, (ref - logits).abs().max().item())
        return logits


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
        policy: A :class:`~residkit.policies.CachePolicy`, or the name of one
            (:func:`~residkit.policies.resolve_policy`: ``"full"``, ``"none"``, ``"kvdirect"``,
            ``"window"``, ``"streaming"``, ``"h2o"``, ``"snapkv"``, ``"tova"``, each at its
            default settings). Its cache is what the loop decodes with.
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

    start = time.perf_counter()
    deviation: float | None = None
    with chosen.make_cache(model) as kv:
        shadow = _Shadow(model) if getattr(chosen, "measure_deviation", False) else None

        def step(ids: Tensor) -> Tensor:
            logits = next_logits(model, ids, kv)
            return shadow.compare(ids, logits) if shadow is not None else logits

        logits = None
        if max_new_tokens > 0:
            for piece in chunked(tokens, chosen.prefill_chunk_size):
                logits = step(piece)
        new, kept_logits = decode_loop(
            step, logits, max_new_tokens, sampler, eos, return_logits, forced_tokens
        )
        deviation = shadow.max_deviation if shadow is not None else None
    elapsed = time.perf_counter() - start

    stats = GenerationStats(**vars(kv.memory))
    stats.total_seconds, stats.new_tokens = elapsed, len(new)
    stats.max_logit_deviation = deviation
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
