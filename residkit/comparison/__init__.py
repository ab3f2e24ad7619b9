"""Eviction baselines against KV-Direct: token match and KL at equal K/V budgets.

The paper (arXiv 2603.19664, Fig. 4) compares KV-Direct with eviction policies by how often
their continuation matches the full cache's and by the KL divergence of their next-token
distributions. :func:`compare_policies` measures both on the same decoding loop
(:func:`residkit.generate`), so the only difference between two rows is what attention saw.

- **Token match** (%): the full cache and the policy each decode ``max_new_tokens`` tokens from
  the prompt (EOS does not stop either; greedy, or sampled with one seed shared by every run);
  the share of positions where the two continuations carry the same token. One early
  divergence usually changes everything after it, so this is a strict measure.
- **KL**: three readings (teacher-forced, the full cache along the policy's text, each on its
  own text), defined in :mod:`residkit.comparison.readings`.

Means are over every step of every prompt (every prompt has ``max_new_tokens`` steps, so the
pooled mean is the mean of the prompts' means); ``..._ci`` columns give the half-width of a 95%
interval over prompts (Student t, :func:`residkit.metrics.mean_interval`).
"""

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import hf_config, n_kv_heads
from residkit._cells import CellStore
from residkit._entry import entry
from residkit._validate import choice, non_negative_int, positive_int
from residkit.architectures import SCOPES, Scope, spec_for
from residkit.capture import Inputs, to_tokens
from residkit.comparison.cells import key_parts, run_cell
from residkit.comparison.readings import KL_READINGS, readings_of
from residkit.comparison.result import PolicyComparison
from residkit.generation.engine import Generation, Generations, decode_loop, generate, next_logits
from residkit.generation.engine import prefill as prefill_cache
from residkit.generation.sampling import Sampler
from residkit.policies.base import CachePolicy, policy_classes, resolve_policy

__all__ = ["BASELINES", "KL_READINGS", "PolicyComparison", "compare_policies", "kept_positions"]

PolicyFactory = Callable[[int], CachePolicy]

BASELINES: tuple[str, ...] = ("window", "streaming", "h2o", "snapkv", "tova", "kvdirect")
"""The policies :func:`compare_policies` runs by default: the paper's five eviction baselines and
KV-Direct. Any name :func:`~residkit.policies.resolve_policy` knows is accepted; each is built
at a budget by its class's ``for_budget`` (StreamingLLM and SnapKV scale their sink count and
observation window to small budgets there)."""


def _resolve(policies: Sequence[str | PolicyFactory] | None) -> list[tuple[str, PolicyFactory]]:
    if isinstance(policies, str) or not (policies is None or isinstance(policies, Sequence)):
        raise TypeError(f"policies must be a list of names or callables, got {policies!r:.80}")
    chosen = list(BASELINES) if policies is None else list(policies)
    out: list[tuple[str, PolicyFactory]] = []
    for p in chosen:
        if isinstance(p, str):
            resolve_policy(p, budget=0)  # a ValueError listing the known names
            out.append((p, policy_classes()[p].for_budget))
        elif callable(p):
            out.append(("", p))  # named from the policy it makes, once a budget is known
        else:
            raise ValueError(f"policies takes names or callables budget -> CachePolicy, got {p!r}")
    return out


def _scoped(policy: CachePolicy, scope: str) -> CachePolicy:
    """``policy`` managing the layers ``scope`` names (policies without a scope stay as they are)."""
    if scope == "global" or not hasattr(policy, "scope"):
        return policy
    return dataclasses.replace(policy, scope=scope)  # type: ignore[call-arg]


def _batch(group: list[str | Tensor]) -> Inputs:
    """One prompt, a list of strings, or token ids of one length stacked ``[batch, pos]``."""
    if len(group) == 1:
        return group[0]
    if isinstance(group[0], Tensor):
        return torch.cat([cast(Tensor, p).reshape(1, -1) for p in group])
    return cast(Inputs, group)


def _prompt_list(prompt: str | Tensor | Sequence[str | Tensor]) -> list[str | Tensor]:
    if not isinstance(prompt, str | Tensor | Sequence):
        raise TypeError(f"prompt must be a prompt or a list of prompts, got {prompt!r:.80}")
    items = [prompt] if isinstance(prompt, str | Tensor) else list(prompt)
    if not items:
        raise ValueError("prompt is an empty list; pass a prompt or a list of prompts")
    return items


@entry
@torch.no_grad()
def compare_policies(
    model: TransformerBridge,
    prompt: str | Tensor | Sequence[str | Tensor],
    *,
    budgets: Sequence[int],
    policies: Sequence[str | PolicyFactory] | None = None,
    max_new_tokens: int = 32,
    kl: str | Sequence[str] = "teacher",
    scope: Scope = "global",
    batch_size: int = 1,
    seed: int | None = None,
    progress: bool = True,
    resume: str | os.PathLike[str] | None = None,
) -> PolicyComparison:
    """Token match (%) and KL against the full cache, per policy and budget.

    See the module docstring for the definitions.

    Args:
        model: A bridge from :func:`residkit.load`.
        prompt: One prompt or a list of them (strings or token ids).
        budgets: K/V budgets (tokens per global layer), each a non-negative int.
        policies: Policy names (:func:`~residkit.policies.resolve_policy`) or callables
            ``budget -> CachePolicy``; default :data:`BASELINES` (the five eviction baselines
            and ``"kvdirect"``).
        max_new_tokens: Positions compared per prompt.
        kl: Which KL readings to measure (:mod:`residkit.comparison.readings`):
            ``"teacher"`` (one extra run per policy whose tokens differ), ``"free"`` (one
            full-cache scoring run then), ``"own"`` (no extra run), ``"both"`` (teacher and
            free), ``"all"``, or a list of names.
        scope: Layers a named policy manages: ``"global"`` (default; sliding-window layers
            keep the model's own window) or ``"all"`` (see :class:`~residkit.policies.KVDirect`).
        batch_size: Prompts decoded together (left padded; each row decodes as its prompt
            alone up to the last bits of the logits, ``tests/test_batch.py``). Memory columns
            are then per row.
        seed: None (default): greedy decoding. An int: every run samples (temperature 1) from
            a generator seeded with it, the same seed for the full cache and every policy, so
            an exact policy draws the full cache's tokens.
        progress: Show a tqdm bar.
        resume: A file of finished cells (JSON lines, created if missing). Each finished
            (policy, budget) cell is written there at once; a later call with the same
            model weights, prompts and arguments, on the same residkit source, reads it back
            instead of decoding again, so an interrupted sweep goes on where it stopped. Any
            other change gives another key, and the cell runs again.

    Returns:
        A :class:`PolicyComparison` (``.table``, ``.steps``, ``.figure()``).

    Raises:
        ValueError: an unknown policy name (the message lists the known ones), an empty or
            negative budget list, ``max_new_tokens < 1``, no prompts, or a policy's own
            ValueError for a budget it cannot take.

    Examples:
        >>> import residkit
        >>> from residkit.comparison import compare_policies
        >>> model = residkit.load("zoo:llama")
        >>> cmp = compare_policies(
        ...     model, "abcdefgh", budgets=[2], policies=["window", "kvdirect"],
        ...     max_new_tokens=4, progress=False,
        ... )
        >>> cmp.table["policy"].tolist()
        ['window', 'kvdirect']
        >>> kvd = cmp.table[cmp.table["policy"] == "kvdirect"]
        >>> kvd["token_match"].item(), kvd["mean_kl"].item()
        (100.0, 0.0)
    """
    positive_int("max_new_tokens", max_new_tokens)
    readings = readings_of(kl)
    choice("scope", scope, SCOPES)
    if isinstance(budgets, str) or not isinstance(budgets, Sequence | range):
        raise TypeError(f"budgets must be a list of ints, got {budgets!r:.80}")
    budgets = list(budgets)
    if not budgets:
        raise ValueError("budgets is empty; pass at least one K/V budget")
    for b in budgets:
        non_negative_int("budget", b)
    positive_int("batch_size", batch_size)
    factories = _resolve(policies)
    items = _prompt_list(prompt)
    groups = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    for group in groups if batch_size > 1 else []:
        kinds = {isinstance(p, Tensor) for p in group}
        lengths = {p.reshape(-1).shape[0] for p in group if isinstance(p, Tensor)}
        if kinds == {True, False} or len(lengths) > 1:
            raise ValueError(
                "batch_size > 1 takes prompts as strings (each is tokenised, then padded) or as "
                f"token ids of one length; got token id lengths {sorted(lengths)}"
            )
    # Build every policy first, so a bad (policy, budget) pair fails before any decoding.
    grid = [
        [_scoped(factory(b), scope) if name else factory(b) for b in budgets]
        for name, factory in factories
    ]
    labels: list[str] = []
    for (name, _), row in zip(factories, grid, strict=True):
        base = name or row[0].name
        n = sum(label.split("#")[0] == base for label in labels)
        labels.append(f"{base}#{n + 1}" if n else base)  # two H2O variants: h2o, h2o#2

    def run(
        group: list[str | Tensor], policy: CachePolicy | str = "full", forced: Tensor | None = None
    ) -> list[Generation]:
        sampling: dict[str, Any] = {} if seed is None else {"do_sample": True, "seed": seed}
        out = generate(
            model,
            _batch(group),
            max_new_tokens=max_new_tokens,
            policy=policy,
            return_logits=True,
            stop_at_eos=False,
            forced_tokens=forced,
            **sampling,
        )
        return list(out) if isinstance(out, Generations) else [out]

    store = None if resume is None else CellStore(resume, name="resume")
    common = None if store is None else key_parts(model, groups, max_new_tokens, readings, seed)
    refs: dict[int, list[Generation]] = {}

    def ref(i: int) -> list[Generation]:
        if i not in refs:  # only for a group some unfinished cell needs
            refs[i] = run(groups[i])
        return refs[i]

    steps: list[dict[str, object]] = []
    rows: list[dict[str, object]] = []
    bar = tqdm(total=len(grid) * len(budgets) * len(items), disable=not progress, desc="policies")
    for label, row in zip(labels, grid, strict=True):
        for budget, policy in zip(budgets, row, strict=True):
            key = None
            if store is not None:
                key = store.key({**(common or {}), "label": label, "budget": budget,
                                 "policy": repr(policy)})  # fmt: skip
                done = store.get(key)
                if done is not None:
                    steps += done["steps"]
                    rows.append(done["row"])
                    bar.update(len(items))
                    continue
            t0 = time.perf_counter()
            summary, cell = run_cell(label, budget, policy, groups, ref, run, readings, bar)
            steps += cell
            rows.append(summary)
            if store is not None and key is not None:
                store.put(key, {"row": summary, "steps": cell}, time.perf_counter() - t0)
    bar.close()
    return PolicyComparison(rows=rows, steps=pd.DataFrame(steps))


@entry
@torch.no_grad()
def kept_positions(
    model: TransformerBridge,
    prompt: str | Tensor,
    policy: CachePolicy | str,
    max_new_tokens: int = 30,
) -> pd.DataFrame:
    """Positions whose K/V attention can read after a greedy generation under ``policy``.

    Drives the policy's cache with the engine's own loop
    (:func:`residkit.generation.engine.decode_loop`, greedy, EOS ignored). Eviction caches report
    what they kept; policies that drop nothing
    (full cache, KV-Direct, which recomputes what left its active window) report every position
    fed. Sliding-window layers are left out: the model bounds them, not the policy.

    Returns:
        One row per kept token: ``layer``, ``kv_head``, ``position`` (absolute). The tokens fed
        are the prompt plus ``max_new_tokens - 1`` (the last chosen token is not fed).

    Examples:
        >>> import residkit
        >>> from residkit.policies.window import Window
        >>> model = residkit.load("zoo:llama")
        >>> df = kept_positions(model, "abcdefgh", Window(3), max_new_tokens=4)
        >>> sorted(set(df["position"]))  # 9 prompt tokens + 3 fed: positions 9, 10, 11 kept
        [9, 10, 11]
    """
    policy = resolve_policy(policy)  # a policy or its name; anything else is named
    positive_int("max_new_tokens", max_new_tokens)
    tokens: Int[Tensor, "1 pos"] = to_tokens(model, prompt)
    with policy.make_cache(model) as cache:
        logits = prefill_cache(model, cache, tokens, policy.prefill_chunk_size)
        step = lambda t: next_logits(model, t, cache)  # noqa: E731
        new, _ = decode_loop(step, logits, max_new_tokens, Sampler(), eos=None)
    per_layer = getattr(cache, "held_positions", None)
    kept = per_layer() if per_layer is not None else None
    if kept is None:
        fed = tokens.shape[1] + len(new) - 1
        sliding = set(spec_for(model).sliding_layers(hf_config(model)))
        n_kv = n_kv_heads(model)
        everything = torch.arange(fed).expand(1, n_kv, fed)
        kept = {layer: everything for layer in range(model.cfg.n_layers) if layer not in sliding}
    rows = [
        (layer, head, pos)
        for layer, positions in kept.items()
        for head in range(positions.shape[1])
        for pos in positions[0, head].tolist()
    ]
    return pd.DataFrame(rows, columns=["layer", "kv_head", "position"])
