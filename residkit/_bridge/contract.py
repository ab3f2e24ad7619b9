"""Every assumption residkit makes about TransformerLens and transformers, checked by name.

residkit reaches into the bridge in the places :mod:`residkit._bridge` lists. Each such
reach rests on a fact about the installed libraries; :data:`CONTRACT` names each fact and
checks it on a real forward. :func:`check_contract` runs them all once per model (first use),
so an upgrade that breaks one fails loudly, naming what broke, instead of giving silently
wrong results. ``tests/test_bridge.py`` runs the contract on every family and breaks
assumptions on purpose to show each is caught.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge.cache import CacheLayer, cached_forward, install, layer_kv, new_cache
from residkit._bridge.hooks import hook_count, hook_points, muted
from residkit._bridge.model import (
    attn_norm,
    head_at,
    hf_config,
    linear,
    n_kv_heads,
    part_module,
    positionwise_at,
    positionwise_parts,
    skipped_blocks,
)
from residkit.architectures import ArchSpec, spec_for

__all__ = ["CONTRACT", "Assumption", "BridgeContractError", "check_contract"]


class BridgeContractError(RuntimeError):
    """An assumption residkit makes about TransformerLens / transformers does not hold."""

    def __init__(self, name: str, what: str, detail: str) -> None:
        self.assumption = name
        super().__init__(
            f"residkit's assumption {name!r} does not hold with transformers "
            f"{version('transformers')} and transformer-lens {version('transformer-lens')}: "
            f"{what} ({detail}). residkit would give wrong results here; it is tested with "
            "the versions its pyproject allows"
        )


@dataclass(frozen=True)
class Assumption:
    """One fact residkit relies on, and how to check it on a model."""

    name: str
    what: str
    check: Callable[[TransformerBridge, ArchSpec], None]


def _tokens(model: TransformerBridge, n: int) -> Tensor:
    # Checks that concern the first blocks stop there (``stop_at_layer``): a real model's
    # forward costs about one read of its weights.
    device = next(model.parameters()).device
    return torch.arange(1, n + 1, device=device).unsqueeze(0) % model.cfg.d_vocab


def _hooks_live_in_torch_dicts(model: TransformerBridge, spec: ArchSpec) -> None:
    point = model.hook_dict[spec.resid_pre_hook.format(layer=0)]
    calls: list[int] = []
    before = hook_count(model)
    with model.hooks(fwd_hooks=[(point.name, lambda act, hook: calls.append(1))]):
        assert hook_count(model) == before + 1, "a hook added by model.hooks is not counted"
        with muted([point]):
            model(_tokens(model, 2), stop_at_layer=1)
        assert not calls, "muting the HookPoint's _forward_hooks did not silence its hook"
        model(_tokens(model, 2), stop_at_layer=1)
    assert calls == [1], f"the hook fired {len(calls)} times in one unmuted forward"
    assert hook_count(model) == before, "model.hooks left a hook behind"


def _forward_override(model: TransformerBridge, spec: ArchSpec) -> None:
    seen: dict[str, Tensor] = {}
    first, second = (spec.resid_pre_hook.format(layer=i) for i in (0, 1))

    def save(act: Tensor, hook: Any) -> None:
        seen[str(hook.name)] = act.detach().clone()

    tokens = _tokens(model, 3)
    with model.hooks(fwd_hooks=[(first, save)]):
        model(tokens, stop_at_layer=1)
    with model.hooks(fwd_hooks=[(second, save)]), skipped_blocks(model, 1):
        model(tokens, stop_at_layer=2)
    assert "forward" not in model.blocks[0].__dict__, "the forward override was not removed"
    got = [seen.get(str(model.hook_dict[n].name)) for n in (first, second)]
    assert got[0] is not None and got[1] is not None, "resid_pre hooks did not fire"
    assert torch.equal(got[0], got[1]), (
        "with block 0's forward replaced by the identity, block 1 did not receive block 0's "
        "input: the override was ignored or the model loop does not take a bare tensor"
    )


def _projections(model: TransformerBridge, spec: ArchSpec) -> None:
    for layer in range(model.cfg.n_layers):
        attn = model.blocks[layer].attn
        for which in ("q", "k", "v"):
            module = linear(getattr(attn, which))
            assert isinstance(module, torch.nn.Module) and hasattr(module, "out_features"), (
                f"blocks.{layer}.attn.{which} wraps {type(module).__name__}, not a linear layer"
            )
        if spec.attn_norm_path is not None:
            norm = attn_norm(model, layer, spec.attn_norm_path)
            assert norm is not None and hook_points(norm), (
                f"layer {layer}'s {spec.attn_norm_path} is not a bridge component"
            )


def _writes_given_cache(model: TransformerBridge, spec: ArchSpec) -> None:
    cache = new_cache(model)
    with muted(hook_points(model)):
        cached_forward(model, _tokens(model, 1), cache, return_type=None)
    assert cache.get_seq_length() == 1, (
        "a forward left the cache it was given empty: attention did not receive it, and "
        "cached decoding would attend to the newest token alone"
    )


class _ProbeLayer(CacheLayer):
    def __init__(self) -> None:
        super().__init__()
        self.queries: list[int] = []
        self.count = 0

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        if self.count:
            assert self.keys is not None and self.values is not None
            keys = torch.cat([self.keys, keys], dim=-2)
            values = torch.cat([self.values, values], dim=-2)
        self.keys, self.values = keys, values
        self.count = keys.shape[-2]
        return keys, values

    def tokens_seen(self) -> int:
        return self.count

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        self.queries.append(query_length)
        return self.count + query_length, 0


def _cache_layer_protocol(model: TransformerBridge, spec: ArchSpec) -> None:
    layers = spec.global_layers(hf_config(model))
    probe, reference = new_cache(model), new_cache(model)
    probes = {layer: _ProbeLayer() for layer in layers}
    for layer, p in probes.items():
        install(probe, layer, p)
    with muted(hook_points(model)):
        ours = [cached_forward(model, t, probe) for t in (_tokens(model, 3), _tokens(model, 1))]
        theirs = [
            cached_forward(model, t, reference) for t in (_tokens(model, 3), _tokens(model, 1))
        ]
    for layer, p in probes.items():
        assert p.count == 4 and p.ready, f"layer {layer}'s cache layer saw {p.count} of 4 tokens"
        kv = layer_kv(probe, layer)
        assert kv is not None and kv[0].shape[-2] == 4, f"layer {layer}'s K/V are not readable"
        assert kv[0].shape[1] == n_kv_heads(model), f"layer {layer} holds the wrong KV heads"
    asked = {q for p in probes.values() for q in p.queries}
    assert not layers or (asked <= {3, 1} and asked), f"get_mask_sizes got query lengths {asked}"
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b), "a cache of residkit layers gave other logits than DynamicCache"


def _capture_cache(model: TransformerBridge, spec: ArchSpec) -> None:
    from residkit.projector import KVProjector

    tokens = _tokens(model, 3)
    cache = new_cache(model)
    resid: dict[str, Tensor] = {}
    name = spec.resid_pre_hook.format(layer=0)

    def save(act: Tensor, hook: Any) -> None:
        resid["x"] = act.detach().clone()

    with model.hooks(fwd_hooks=[(name, save)]):
        cached_forward(model, tokens, cache, stop_at_layer=1)
    pos = torch.arange(3, device=tokens.device).unsqueeze(0)
    keys, values, _ = KVProjector(model)(0, resid["x"], pos, chunks=[3])
    stored = layer_kv(cache, 0)
    assert stored is not None, "the model's cache holds no K/V for layer 0"
    assert torch.equal(keys, stored[0][..., -3:, :]) and torch.equal(
        values, stored[1][..., -3:, :]
    ), "K/V captured from the attention bridge differ from what the model stored"


def _hook_names(model: TransformerBridge, spec: ArchSpec) -> None:
    n = model.cfg.n_layers
    names = [spec.resid_hook(layer, n) for layer in range(n + 1)]
    names += [spec.value_hook.format(layer=0), spec.pattern_hook.format(layer=0)]
    names += [spec.key_hook.format(layer=0)] if spec.key_hook else []
    missing = [name for name in names if name not in model.hook_dict]
    assert not missing, f"hook points {missing} do not exist"


def _pattern_hook(model: TransformerBridge, spec: ArchSpec) -> None:
    shapes: list[tuple[int, ...]] = []
    name = spec.pattern_hook.format(layer=0)
    with model.hooks(fwd_hooks=[(name, lambda act, hook: shapes.append(tuple(act.shape)))]):
        model(_tokens(model, 3), stop_at_layer=1)
    assert shapes == [(1, model.cfg.n_heads, 3, 3)], f"{name} gave shapes {shapes}"


def _head_at_positions(model: TransformerBridge, spec: ArchSpec) -> None:
    tokens = _tokens(model, 4).repeat(2, 1)
    tokens[1] = tokens[1].flip(0)
    full = model(tokens)
    keep = torch.tensor([1, 3, 6, 7], device=tokens.device)  # row 0: 1, 3; row 1: 2, 3
    with head_at(model, keep):
        some = model(tokens)
    assert "forward" not in model.unembed.__dict__, "the unembedding's override was not removed"
    want = full.reshape(-1, full.shape[-1])[keep].unsqueeze(0)
    assert some.shape == want.shape, f"logits of shape {tuple(some.shape)}, not {tuple(want.shape)}"
    # Another GEMM shape may round differently: the same logits up to float32 rounding.
    scale = want.abs().max().item()
    assert torch.allclose(some, want, rtol=1e-5, atol=1e-5 * scale), (
        "the unembedding run at some positions gave other logits than the full forward there"
    )


def _positionwise_parts(model: TransformerBridge, spec: ArchSpec) -> None:
    tokens = _tokens(model, 4).repeat(2, 1)
    tokens[1] = tokens[1].flip(0)
    parts = positionwise_parts(model)
    full = model(tokens)
    n = model.cfg.n_layers
    keep = torch.arange(8, device=tokens.device)
    with positionwise_at(model, {layer: keep for layer in range(n)}, parts):
        same = model(tokens)
    left = [
        p for layer in range(n) for p in parts if "forward" in part_module(model, layer, p).__dict__
    ]
    assert not left, f"the overrides of {left} were not removed"
    # Every position kept: the parts' own GEMMs, on the same rows, so the same logits up to
    # float32 rounding of another batch layout.
    scale = full.abs().max().item()
    assert torch.allclose(same, full, rtol=1e-5, atol=1e-5 * scale), (
        f"{sorted(parts)} run through positionwise_at at every position gave other logits"
    )
    if parts:  # the control: a part left out at one position changes what follows it
        with positionwise_at(model, {0: keep[keep != 5]}, parts):
            other = model(tokens)
        assert not torch.allclose(other[1, 1:], full[1, 1:]), (
            f"{sorted(parts)} left out at one position changed nothing: they are not on the path"
        )


CONTRACT: tuple[Assumption, ...] = (
    Assumption(
        "hook-names",
        "every hook point residkit names (architecture table) exists on the bridge",
        _hook_names,
    ),
    Assumption(
        "hooks-in-torch-hook-dicts",
        "a HookPoint keeps its hooks in torch's _forward_hooks, so clearing it mutes them",
        _hooks_live_in_torch_dicts,
    ),
    Assumption(
        "instance-forward-override",
        "a block's forward can be replaced per instance, and the model loop passes a decoder "
        "layer's bare output tensor to the next layer",
        _forward_override,
    ),
    Assumption(
        "qkv-norm-components",
        "each attention bridge has q/k/v components wrapping linear layers, and the norm "
        "feeding them sits at the architecture table's path",
        _projections,
    ),
    Assumption(
        "forward-writes-given-cache",
        "a forward given a transformers Cache writes each layer's K/V into it",
        _writes_given_cache,
    ),
    Assumption(
        "cache-layer-protocol",
        "transformers calls a cache layer's update() with the new K/V and get_mask_sizes() "
        "with the query length, and attends to what update() returns",
        _cache_layer_protocol,
    ),
    Assumption(
        "attention-capture",
        "calling the attention bridge with a cache that raises in update() yields the K/V "
        "the model itself stores",
        _capture_cache,
    ),
    Assumption(
        "head-at-positions",
        "the unembedding's forward can be replaced per instance, receives the final normed "
        "residual [batch, pos, d_model], and what it returns is the forward's logits (after "
        "any soft-capping), whatever the positions",
        _head_at_positions,
    ),
    Assumption(
        "positionwise-parts",
        "a block's MLP (and, on the position-embeddings attention bridge, its query and output "
        "projections) is called once per forward on [batch, pos, width] and can be replaced "
        "per instance",
        _positionwise_parts,
    ),
    Assumption(
        "pattern-hook-shape",
        "hook_pattern carries [batch, n_heads, query, key] attention weights",
        _pattern_hook,
    ),
)
"""The assumptions, in the order :func:`check_contract` checks them."""

_CHECKED: weakref.WeakKeyDictionary[TransformerBridge, bool] = weakref.WeakKeyDictionary()


@torch.no_grad()
def check_contract(model: TransformerBridge, *, force: bool = False) -> None:
    """Check every assumption of :data:`CONTRACT` on ``model`` (once per model).

    Raises:
        BridgeContractError: an assumption does not hold; the message names it.
        ValueError: weights hold NaN or inf (a damaged checkpoint, not a library change).
    """
    if _CHECKED.get(model) and not force:
        return
    # Non-finite weights fail the probes below (NaN != NaN) for reasons that are not the
    # libraries'; say what they are instead.
    broken = [  # weights offloaded to disk sit on the meta device here; they are not read
        n
        for n, p in model.named_parameters()
        if p.device.type != "meta" and not bool(torch.isfinite(p).all())
    ]
    if broken:
        raise ValueError(
            f"the model's weights hold NaN or inf in {len(broken)} tensor(s) ({', '.join(broken[:3])}"
            f"{', ...' if len(broken) > 3 else ''}): the checkpoint is damaged. For a real model, "
            "convert it again with `residkit models fetch NAME --force`"
        )
    spec = spec_for(model)
    # The user's hooks must not see the probe's forwards.
    with muted(hook_points(model)):
        for assumption in CONTRACT:
            try:
                assumption.check(model, spec)
            except (AssertionError, AttributeError, KeyError, TypeError) as err:
                raise BridgeContractError(assumption.name, assumption.what, str(err)) from err
    _CHECKED[model] = True
