"""K and V recomputed from the residual stream, compared bit for bit with the model's own.

:func:`recompute_kv` hands the residual entering block ``l`` to
:class:`residkit.projector.KVProjector`, which runs the family's own attention-input norm and
attention bridge up to the cache write, where a capturing cache takes ``(k, v)`` and stops the
forward. Whatever the family does before the cache write (norm, fused QKV split, biases,
QK-norm, partial or per-layer-type rotary) is done by the family's own code; attention scores
and the MLP are never computed.

**When is it bit-identical?** On CPU, a float32 GEMM row computed alone (M = 1) can differ in
the last bits from the same row computed inside a larger matrix, and the thread count changes
which rows differ. So ``mode="exact"`` recomputes every original chunk with its original shape
(the prompt as one chunk, then each decoded token alone) and is bitwise equal; ``mode="fast"``
recomputes all positions in one call and reports the max error. See ``docs/gemm_shapes.md``.
"""

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import (
    cached_forward,
    hf_config,
    hooked,
    layer_kv,
    new_cache,
    point_names,
    temporary_hooks,
)
from residkit._bridge.contract import check_contract
from residkit._entry import entry
from residkit._validate import check_positions, choice, non_negative_int
from residkit.architectures import spec_for
from residkit.capture import Inputs, capture_residuals, to_tokens
from residkit.projector import KVProjector

__all__ = [
    "KVReport",
    "gemm_shape_finding",
    "kv_reconstruction_report",
    "model_kv_cache",
    "recompute_kv",
]

Mode = Literal["exact", "fast"]
MODES: tuple[Mode, ...] = ("exact", "fast")


def recompute_layer(
    model: TransformerBridge,
    layer: int,
    residual: Tensor,
    position_ids: Tensor,
    *,
    chunks: Sequence[int] | None = None,
    pre_rotary_keys: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Unchecked core of :func:`recompute_kv` (see :class:`residkit.projector.KVProjector`).

    ``chunks``: sizes of the original forward chunks, for their GEMM shapes (bitwise on CPU).
    User hooks do not fire.
    """
    return KVProjector(model)(
        layer, residual, position_ids, chunks=chunks, pre_rotary_keys=pre_rotary_keys
    )


@entry
@torch.no_grad()
def recompute_kv(
    model: TransformerBridge,
    layer: int,
    residual: Float[Tensor, "batch pos d_model"],
    positions: Sequence[int] | Int[Tensor, " pos"] | Int[Tensor, "batch pos"],
) -> tuple[
    Float[Tensor, "batch n_kv_heads pos d_head"], Float[Tensor, "batch n_kv_heads pos d_head"]
]:
    """K and V of block ``layer`` from the residual entering it, exactly as attention sees them.

    Args:
        model: A bridge from :func:`residkit.load`.
        layer: Block index, ``0..n_layers - 1``.
        residual: ``blocks.{layer}.hook_resid_pre`` values.
        positions: Absolute positions of the residual's tokens (rotary needs them).

    Returns:
        ``(keys, values)``, each ``[batch, n_kv_heads, pos, d_head]``, keys after any k-norm and
        rotary (with the layer's own rope base on Gemma 3).

    Raises:
        TypeError: a layer or positions that are not ints, a residual that is not a float
            ``[batch, pos, d_model]`` tensor.
        ValueError: layer out of range, residual of the wrong width, positions of wrong length,
            or user hooks on the layer's recompute path (which a recompute would not run).

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:qwen3")
        >>> resid = residkit.capture_residuals(model, "abc", layers=[1])[0]
        >>> k, v = recompute_kv(model, 1, resid, positions=range(resid.shape[1]))
        >>> k.shape  # batch, n_kv_heads, BOS + 3 bytes, d_head
        torch.Size([1, 2, 4, 16])
    """
    n = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(f"layer must be an int, got {layer!r} ({type(layer).__name__})")
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} out of range: this model has blocks 0..{n - 1}")
    if not isinstance(residual, Tensor) or not residual.is_floating_point() or residual.ndim != 3:
        raise TypeError(
            f"residual must be a float tensor [batch, pos, d_model], got {residual!r:.80}"
        )
    if residual.shape[-1] != model.cfg.d_model:
        raise ValueError(
            f"residual has width {residual.shape[-1]} but d_model is {model.cfg.d_model}"
        )
    if not residual.shape[0] or not residual.shape[1]:
        raise ValueError(f"residual is empty: shape {tuple(residual.shape)}")
    weights = next(model.parameters()).dtype
    if residual.dtype != weights:
        raise ValueError(f"residual is {residual.dtype} but the model computes in {weights}")
    if isinstance(positions, Tensor):
        if positions.is_floating_point() or positions.dtype == torch.bool:
            raise TypeError(f"positions must be integers, got a {positions.dtype} tensor")
        pos = positions
    else:
        pos = torch.as_tensor(check_positions("positions", positions), dtype=torch.long)
    pos = pos.to(device=residual.device, dtype=torch.long)
    if pos.ndim == 1:
        pos = pos.unsqueeze(0).expand(residual.shape[0], -1)
    if pos.shape != residual.shape[:2]:
        raise ValueError(
            f"positions have shape {tuple(pos.shape)} but the residual has "
            f"{residual.shape[1]} positions (batch {residual.shape[0]})"
        )
    if (pos < 0).any():
        raise ValueError("positions must be non-negative absolute positions")
    projector = KVProjector(model)
    busy = hooked(projector.kv_path_points(layer))
    if busy:
        names = point_names(model, {str(p.name) for p in busy})
        raise ValueError(
            f"hooks at {names} sit between layer {layer}'s input and its cache write; "
            "recompute_kv runs with hooks muted, so its K/V would not be what the hooked model "
            "stores. Remove those hooks first"
        )
    keys, values, _ = projector(layer, residual, pos)
    return keys, values


@dataclass
class KVReport:
    """Result of :func:`kv_reconstruction_report`: per layer, recomputed vs hooks vs cache.

    Examples:
        >>> import residkit
        >>> report = residkit.kv_reconstruction_report(residkit.load("zoo:llama"), "abc", decode_steps=2)
        >>> report.passed, len(report.table) == residkit.load("zoo:llama").cfg.n_layers
        (True, True)
    """

    rows: list[dict[str, Any]]
    mode: Mode
    chunks: list[int]
    family: str

    @property
    def passed(self) -> bool:
        """True when K and V equal both references bitwise at every layer."""
        cols = ["k_hook_equal", "v_hook_equal", "k_cache_equal", "v_cache_equal"]
        return all(bool(r[c]) for r in self.rows for c in cols)

    @property
    def table(self) -> pd.DataFrame:
        """One row per layer: equality flags and max |error| against hooks and the cache."""
        return pd.DataFrame(self.rows)

    def figure(self, *, title: str | None = None) -> go.Figure:
        """Max |recomputed - reference| per layer (0 plotted as 0: every bar absent = exact)."""
        df = self.table
        fig = go.Figure()
        for col in ("k_hook_max_err", "v_hook_max_err", "k_cache_max_err", "v_cache_max_err"):
            fig.add_bar(x=df["layer"], y=df[col], name=col.replace("_max_err", ""))
        fig.update_layout(
            title=title
            or f"K/V from residuals, mode={self.mode} ({self.family}): "
            f"{'bitwise exact' if self.passed else 'not bitwise'}",
            xaxis_title="layer",
            yaxis_title="max |error|",
            barmode="group",
        )
        return fig


@entry
def model_kv_cache(model: TransformerBridge, prompt: Inputs) -> Any:
    """The K/V the model itself stores for ``prompt`` (text or ids of one sequence): one
    full-cache forward, returning the
    ``transformers.DynamicCache`` it filled (keys and values ``[1, n_kv_heads, pos, d_head]``
    per layer).

    Goes through residkit's adapter, so the cache is written on every supported transformers
    (on 5.24 TransformerLens's bridge ignores a cache handed to it the usual way).

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> cache = model_kv_cache(model, model.to_tokens("abc"))
        >>> cache.get_seq_length() == model.to_tokens("abc").shape[1]
        True
    """
    ids = to_tokens(model, prompt)
    if ids.shape[0] != 1:
        raise ValueError(f"model_kv_cache takes one sequence, got a batch of {ids.shape[0]}")
    cache = new_cache(model)
    with torch.no_grad():
        cached_forward(model, ids, cache)
    return cache


def _err(a: Tensor, b: Tensor) -> tuple[bool, float]:
    if a.shape != b.shape:
        return False, float("inf")
    return torch.equal(a, b), (a.double() - b.double()).abs().max().item()


def _append(store: dict[str, list[Tensor]], name: str, act: Tensor, hook: object) -> None:
    store.setdefault(name, []).append(act.detach().clone())


@entry
@torch.no_grad()
def kv_reconstruction_report(
    model: TransformerBridge,
    prompt: Inputs,
    *,
    mode: Mode = "exact",
    decode_steps: int = 0,
) -> KVReport:
    """Recompute K/V at every layer from captured residuals and compare with the model's own.

    The model runs the prompt with its own cache (``use_cache=True``), then ``decode_steps``
    greedy tokens one at a time, while residkit captures the residual entering every block and
    the hook values. K/V recomputed from those residuals are compared with (a) the hooks
    (``key_hook`` of the architecture table, or the pre-rotary ``hook_k`` for families whose
    bridge fires no post-rotary hook) and ``hook_v``, and (b) the K/V in the model's cache (for
    sliding-window layers, the window the model keeps).

    Args:
        model: A bridge from :func:`residkit.load`.
        prompt: One prompt.
        mode: ``"exact"``: each original chunk (the prompt, then each decoded token) recomputed
            with its original shape, bitwise. ``"fast"``: all positions in one call.
        decode_steps: Greedy tokens decoded after the prompt, each a chunk of one.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:gemma3")
        >>> kv_reconstruction_report(model, "Keys are projections.", decode_steps=3).passed
        True
    """
    choice("mode", mode, MODES)
    non_negative_int("decode_steps", decode_steps)
    spec = spec_for(model)
    tokens = to_tokens(model, prompt, extra=decode_steps)
    if tokens.shape[0] != 1:
        raise ValueError(
            f"kv_reconstruction_report takes one prompt, got a batch of {tokens.shape[0]}"
        )
    n = model.cfg.n_layers
    key_hook = spec.key_hook or spec.pre_rotary_key_hook
    store: dict[str, list[Tensor]] = {}
    names = [spec.resid_pre_hook, key_hook, spec.value_hook]
    hooks = [
        (h.format(layer=layer), partial(_append, store, h.format(layer=layer)))
        for layer in range(n)
        for h in names
    ]
    check_contract(model)
    cache = new_cache(model)
    chunks = [tokens.shape[1]]
    with temporary_hooks(model, hooks):
        logits = cached_forward(model, tokens, cache)
        for _ in range(decode_steps):
            nxt = logits[:, -1:].argmax(-1)
            logits = cached_forward(model, nxt, cache)
            chunks.append(1)
    total = sum(chunks)
    rows = []
    for layer in range(n):
        resid = torch.cat(store[spec.resid_pre_hook.format(layer=layer)], dim=1)
        # Exact: the original chunk shapes for the projections; fast: one GEMM.
        k, v, pre = recompute_layer(
            model,
            layer,
            resid,
            torch.arange(total, device=resid.device).unsqueeze(0),
            chunks=chunks if mode == "exact" else None,
            pre_rotary_keys=spec.key_hook is None,
        )
        hook_k = torch.cat(store[key_hook.format(layer=layer)], dim=1).transpose(1, 2)
        hook_v = torch.cat(store[spec.value_hook.format(layer=layer)], dim=1).transpose(1, 2)
        k_for_hook = k if pre is None else pre.transpose(1, 2)
        stored = layer_kv(cache, layer)
        assert stored is not None
        cached_k, cached_v = stored
        kept = cached_k.shape[2]
        k_hook_eq, k_hook_err = _err(k_for_hook, hook_k)
        v_hook_eq, v_hook_err = _err(v, hook_v)
        k_cache_eq, k_cache_err = _err(k[:, :, total - kept :], cached_k)
        v_cache_eq, v_cache_err = _err(v[:, :, total - kept :], cached_v)
        rows.append(
            {
                "layer": layer,
                "layer_type": spec.layer_type(hf_config(model), layer),
                "key_hook": key_hook.format(layer=layer).split(".")[-1]
                + ("" if spec.key_hook else " (pre-rotary)"),
                "cached_positions": kept,
                "k_hook_equal": k_hook_eq,
                "k_hook_max_err": k_hook_err,
                "v_hook_equal": v_hook_eq,
                "v_hook_max_err": v_hook_err,
                "k_cache_equal": k_cache_eq,
                "k_cache_max_err": k_cache_err,
                "v_cache_equal": v_cache_eq,
                "v_cache_max_err": v_cache_err,
            }
        )
    return KVReport(rows=rows, mode=mode, chunks=chunks, family=spec.family)


@entry
@torch.no_grad()
def gemm_shape_finding(
    model: TransformerBridge,
    prompt: Inputs,
    *,
    layer: int = 0,
    threads: Sequence[int] = (1, 2),
) -> pd.DataFrame:
    """Measure how often a GEMM row computed alone differs from the same row in a batch.

    Recomputes layer ``layer``'s K/V twice from the same captured residual: once as one call
    over all positions (the prompt's original shape), once one position at a time (M = 1),
    under each torch thread count, and counts positions whose K or V differ bitwise.

    Returns:
        One row per thread count: positions, positions_differing, max_abs_err.
    """
    tokens = to_tokens(model, prompt)
    resid = capture_residuals(model, tokens, layers=[layer])[0]
    pos = torch.arange(tokens.shape[1], device=resid.device).unsqueeze(0)
    before = torch.get_num_threads()
    rows = []
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            k_all, v_all, _ = recompute_layer(model, layer, resid, pos)
            singles = [
                recompute_layer(model, layer, resid[:, i : i + 1], pos[:, i : i + 1])
                for i in range(pos.shape[1])
            ]
            k_one = torch.cat([s[0] for s in singles], dim=2)
            v_one = torch.cat([s[1] for s in singles], dim=2)
            differs = (
                (k_all != k_one).flatten(3).any(-1) | (v_all != v_one).flatten(3).any(-1)
            ).any(1)
            err = max((k_all - k_one).abs().max().item(), (v_all - v_one).abs().max().item())
            rows.append(
                {
                    "threads": n_threads,
                    "positions": pos.shape[1],
                    "positions_differing": int(differs.sum()),
                    "max_abs_err": err,
                    "dtype": str(resid.dtype).removeprefix("torch."),
                }
            )
    finally:
        torch.set_num_threads(before)
    return pd.DataFrame(rows)
