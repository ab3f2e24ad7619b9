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
from dataclasses import fields
from typing import Any, overload

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import cached_forward, muted_hook_points, new_cache
from residkit._entry import entry
from residkit._validate import non_negative_int
from residkit.capture import Inputs, to_tokens
from residkit.generation.feed import Feed, eos_ids, is_batch, pad_id
from residkit.generation.results import Generation, Generations, GenerationStats
from residkit.generation.sampling import Sampler, check_sampling, sample_next
from residkit.policies import CachePolicy, KVDirect, resolve_policy
from residkit.policies.base import chunked

__all__ = [
    "Generation",
    "GenerationStats",
    "Generations",
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
    model: TransformerBridge, ids: Int[Tensor, "batch pos"], cache: Any, **kwargs: Any
) -> Float[Tensor, "batch vocab"]:
    """Logits after ``ids``, fed through ``model`` with ``cache``: the unembedding runs at the
    last position only (transformers' ``generate`` does the same; a whole-sequence unembedding
    is another GEMM shape, different in the last bits). ``kwargs`` (a padded batch's
    ``attention_mask`` and ``position_ids``) go to the forward."""
    return cached_forward(model, ids, cache, logits_to_keep=1, **kwargs)[:, -1]


def prefill(
    model: TransformerBridge,
    cache: Any,
    tokens: Int[Tensor, "batch pos"],
    chunk: int | None,
    feed: Feed | None = None,
) -> Float[Tensor, "batch vocab"]:
    """Feed ``tokens`` in forwards of at most ``chunk`` positions; the last one's logits.

    With ``feed`` (a padded batch), each forward also gets its mask and positions.
    """
    end = 0
    for piece in chunked(tokens, chunk):
        end += piece.shape[1]
        extra = feed.kwargs(end, piece.shape[1]) if feed is not None else {}
        logits = next_logits(model, piece, cache, **extra)
    return logits


def decode_loop(
    step: Callable[[Tensor], Tensor],
    logits: Tensor | None,
    max_new_tokens: int,
    sampler: Sampler,
    eos: set[int] | None,
    return_logits: bool = False,
    forced_tokens: Tensor | None = None,
    pad: int = 0,
) -> tuple[list[Tensor], list[Tensor]]:
    """Choose up to ``max_new_tokens`` tokens per row from ``logits`` ``[batch, vocab]``,
    feeding each step's ``[batch, 1]`` tokens to ``step`` (which returns the next logits); the
    last step's tokens are not fed back.

    A row that has chosen an EOS is finished: it is fed ``pad`` from then on, as transformers'
    ``generate`` does, and the loop ends when every row is finished. Returns each step's
    tokens ``[batch]`` and, if ``return_logits``, each step's logits ``[batch, vocab]``.
    ``forced_tokens`` ``[batch, new]`` (or ``[new]``) replace the chosen tokens (teacher forcing).
    """
    new: list[Tensor] = []
    kept: list[Tensor] = []
    unfinished: Tensor | None = None
    eos_ids = None if eos is None else torch.tensor(sorted(eos))
    for i in range(max_new_tokens):
        assert logits is not None
        if return_logits:
            kept.append(logits.detach().clone())
        nxt = sampler(logits)
        if forced_tokens is not None:
            forced = forced_tokens.view(-1, forced_tokens.shape[-1])[:, i : i + 1]
            nxt = forced.expand_as(nxt).to(nxt)
        if unfinished is None:
            unfinished = torch.ones(nxt.shape[0], dtype=torch.bool, device=nxt.device)
        nxt = torch.where(unfinished[:, None], nxt, torch.full_like(nxt, pad))
        new.append(nxt[:, 0])
        if eos_ids is not None:
            unfinished &= ~torch.isin(nxt[:, 0], eos_ids.to(nxt.device))
        if not bool(unfinished.any()) or i == max_new_tokens - 1:
            break
        logits = step(nxt)
    return new, kept


_KVDIRECT_OPTIONS = {f.name for f in fields(KVDirect)} - {"budget"}


@overload
def generate_kvdirect(model: TransformerBridge, prompt: str, **options: Any) -> Generation: ...
@overload
def generate_kvdirect(
    model: TransformerBridge, prompt: list[str] | tuple[str, ...], **options: Any
) -> Generations: ...
@overload
def generate_kvdirect(
    model: TransformerBridge, prompt: Inputs, **options: Any
) -> Generation | Generations: ...


def generate_kvdirect(  # type: ignore[misc]
    model: TransformerBridge, prompt: Inputs, *, budget: int = 64, **options: Any
) -> Generation | Generations:
    """Decode with KV-Direct: :func:`generate` with ``policy=KVDirect(budget, ...)``.

    Args:
        model: A bridge from :func:`residkit.load`.
        prompt: One prompt (string or token ids), or a batch (see :func:`generate`).
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

    def compare(self, ids: Tensor, logits: Tensor, kwargs: dict[str, Any]) -> Tensor:
        with muted_hook_points(self.model):
            ref = next_logits(self.model, ids, self.cache, **kwargs)
        self.max_deviation = max(self.max_deviation, (ref - logits).abs().max().item())
        return logits


@overload
def generate(model: TransformerBridge, prompt: str, **options: Any) -> Generation: ...
@overload
def generate(
    model: TransformerBridge, prompt: list[str] | tuple[str, ...], **options: Any
) -> Generations: ...
@overload
def generate(
    model: TransformerBridge, prompt: Inputs, **options: Any
) -> Generation | Generations: ...


@entry  # type: ignore[misc]  # the overloads above only tell a prompt's type from the result's
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
    forced_tokens: Int[Tensor, "*batch new"] | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Generation | Generations:
    """Decode ``max_new_tokens`` tokens from ``prompt`` under a cache policy.

    Args:
        model: A bridge from :func:`residkit.load`.
        prompt: One prompt (string or token ids ``[pos]`` / ``[1, pos]``), or a batch: a list
            of strings (each tokenised alone, then left padded) or token ids ``[batch, pos]``.
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
        attention_mask: With token ids ``[batch, pos]``: 1 at real tokens, 0 at left padding.

    Returns:
        A :class:`Generation`, or for a batch a :class:`Generations` (one per prompt, each up
        to its own EOS; a finished row is fed padding until every row is done, as
        transformers' ``generate`` does, so each row's tokens are the batch's own).

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
    feed = Feed.of(model, prompt, extra=max_new_tokens, attention_mask=attention_mask)
    tokens = feed.ids
    if forced_tokens is not None:
        forced_tokens = to_tokens(model, forced_tokens)
        if forced_tokens.shape[0] not in (1, feed.batch) or forced_tokens.shape[1] < max_new_tokens:
            raise ValueError(
                f"forced_tokens has shape {tuple(forced_tokens.shape)}; it needs [{feed.batch}, "
                f">= {max_new_tokens}] (max_new_tokens={max_new_tokens})"
            )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
    eos = eos_ids(model) if stop_at_eos else None
    sampler = Sampler(do_sample, temperature, top_k, top_p, generator)

    start = time.perf_counter()
    deviation: float | None = None
    fed = 0
    with chosen.make_cache(model) as kv:
        shadow = _Shadow(model) if getattr(chosen, "measure_deviation", False) else None

        def step(ids: Tensor) -> Tensor:
            nonlocal fed
            fed += ids.shape[1]
            extra = feed.kwargs(fed, ids.shape[1])
            logits = next_logits(model, ids, kv, **extra)
            return shadow.compare(ids, logits, extra) if shadow is not None else logits

        logits = None
        if max_new_tokens > 0:
            for piece in chunked(tokens, chosen.prefill_chunk_size):
                logits = step(piece)
        new, kept_logits = decode_loop(
            step, logits, max_new_tokens, sampler, eos, return_logits, forced_tokens,
            pad=pad_id(model),
        )  # fmt: skip
        deviation = shadow.max_deviation if shadow is not None else None
    elapsed = time.perf_counter() - start

    stats = GenerationStats(**vars(kv.memory))
    stats.total_seconds, stats.max_logit_deviation = elapsed, deviation
    steps = torch.stack(new, dim=1) if new else tokens.new_zeros(feed.batch, 0)
    logits_kept = torch.stack(kept_logits, dim=1) if return_logits and kept_logits else None
    rows = [
        _row(model, feed, i, steps[i], logits_kept, eos, chosen, stats) for i in range(feed.batch)
    ]
    stats.new_tokens = sum(len(r.tokens) for r in rows)
    if not is_batch(prompt):
        return rows[0]
    return Generations(rows, feed.padding, chosen, stats)


def _row(
    model: TransformerBridge,
    feed: Feed,
    i: int,
    steps: Tensor,
    logits: Tensor | None,
    eos: set[int] | None,
    policy: CachePolicy,
    stats: GenerationStats,
) -> Generation:
    """Row ``i`` of a decoded batch, its tokens up to and including its first EOS."""
    n = len(steps)
    if eos is not None:
        hits = [j for j, t in enumerate(steps.tolist()) if t in eos]
        n = hits[0] + 1 if hits else n
    out = steps[:n]
    tok = model.tokenizer
    return Generation(
        prompt_tokens=feed.ids[i, feed.padding[i] :],
        tokens=out,
        text=tok.decode(out.tolist()) if tok is not None else "",
        policy=policy,
        stats=stats,
        logits=None if logits is None else logits[i, :n],
        token_strs=[tok.decode([t]) for t in out.tolist()] if tok is not None else [],
    )
