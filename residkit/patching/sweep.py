"""Activation-patching sweeps: every (layer, position[, head]), batched.

:func:`patching_sweep` is the usual activation-patching experiment: one clean activation
(a residual, an attention or MLP output, one head's ``z``) patched into a corrupted run, for
every (layer, position[, head]). A patch at block ``l`` leaves the residual entering block
``l`` as the corrupted run had it, so every patched run starts there, from the cached
corrupted residual, and blocks below ``l`` never run. The runs that patch the same layer
differ only in which row they patch, so they go through one forward as a batch: the
corrupted prompt repeated along the batch dimension, one patch per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import skipped_blocks, temporary_hooks
from residkit._entry import entry
from residkit._validate import check_positions
from residkit.architectures import spec_for
from residkit.capture import Inputs, capture_residuals, to_tokens

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

__all__ = ["HOOKS", "PatchingSweep", "patched_logits", "patching_sweep"]

HOOKS: tuple[str, ...] = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z")
"""The points :func:`patching_sweep` patches (``z``: one attention head's output, per head)."""

# Bytes of activations and logits one batch may hold: the logits dominate (pos x vocab per
# row), so the default batch keeps them near this bound whatever the model's vocabulary.
_BATCH_BYTES = 384 * 2**20
_MAX_BATCH = 64


@dataclass(frozen=True)
class PatchingSweep:
    """What :func:`patching_sweep` measured.

    Attributes:
        values: ``metric`` of each patched run: ``[layer, pos]``, or ``[layer, pos, head]``
            for ``hook="z"``.
        hook: The patching point.
        positions: The token positions patched (the ``pos`` axis).
        str_tokens: The clean prompt's tokens at those positions (what is patched in there).
        batch_size: Patched runs per forward (the largest chunk: the runs are split evenly).
        n_forwards: Forwards run (the two capture runs included).
        block_runs: Decoder blocks run, one per batch row: ``n_layers - l`` per run patched
            at layer ``l`` (a full forward would run ``n_layers``).

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> sweep = residkit.patching_sweep(model, "ab", "cd", lambda l: l[0, -1, 5], progress=False)
        >>> sweep.table.shape, sweep.n_forwards, sweep.block_runs
        ((12, 4), 6, 30)
    """

    values: Float[Tensor, "layer pos"] | Float[Tensor, "layer pos head"]
    hook: str
    positions: tuple[int, ...]
    str_tokens: tuple[str, ...]
    batch_size: int
    n_forwards: int
    block_runs: int

    @property
    def table(self) -> pd.DataFrame:
        """One row per patched run: layer, pos, token, [head,] value."""
        import pandas as pd

        values = self.values.cpu()
        rows: list[tuple[object, ...]] = []
        for layer in range(values.shape[0]):
            for j, (pos, tok) in enumerate(zip(self.positions, self.str_tokens, strict=True)):
                if values.ndim == 3:
                    for head in range(values.shape[2]):
                        rows.append((layer, pos, tok, head, float(values[layer, j, head])))
                else:
                    rows.append((layer, pos, tok, float(values[layer, j])))
        columns = ["layer", "pos", "token", *(["head"] if values.ndim == 3 else []), "value"]
        return pd.DataFrame(rows, columns=columns)

    def figure(self, *, title: str | None = None) -> go.Figure:
        """Heatmap, diverging at 0: layer (or layer.head for ``z``) x token position."""
        from residkit.viz.patching import patching_heatmap

        return patching_heatmap(self, title=title)


def default_batch_size(model: TransformerBridge, n_pos: int, n_runs: int) -> int:
    """Runs per forward: one batch's logits and widest activations near 384 MiB, at most 64."""
    cfg = model.cfg
    width = cfg.d_vocab + 4 * max(cfg.d_model, getattr(cfg, "d_mlp", None) or cfg.d_model)
    per_row = n_pos * width * 4
    return max(1, min(_MAX_BATCH, n_runs, _BATCH_BYTES // per_row))


@entry
@torch.no_grad()
def patching_sweep(
    model: TransformerBridge,
    clean: Inputs,
    corrupted: Inputs,
    metric: Callable[[Tensor], Tensor],
    *,
    hook: str = "resid_pre",
    positions: Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> PatchingSweep:
    """Activation patching, clean -> corrupted, at every layer and position (and head).

    Entry ``[l, p]`` is ``metric(logits)`` of the corrupted run with the clean run's
    activation at ``hook`` of block ``l``, position ``p``, patched in (``hook="z"``: entry
    ``[l, p, h]``, head ``h``'s ``z`` only). Same quantity as TransformerLens's
    ``get_act_patch_resid_pre``, ``get_act_patch_resid_mid``, ``get_act_patch_attn_out``,
    ``get_act_patch_mlp_out`` and ``get_act_patch_attn_head_out_by_pos``; with
    ``batch_size=1`` the values are bitwise theirs, batched they differ by GEMM-shape rounding
    (``docs/patching.md`` gives the measured size).

    Args:
        model: A bridge from :func:`residkit.load`.
        clean: The prompt whose activations are patched in.
        corrupted: The prompt run with one activation replaced; same token length as ``clean``.
        metric: Maps logits ``[1, pos, vocab]`` of one patched run to a scalar tensor.
        hook: ``"resid_pre"``, ``"resid_mid"``, ``"attn_out"``, ``"mlp_out"`` or ``"z"``.
        positions: Positions to patch; default all.
        batch_size: Patched runs per forward; default from the model size and prompt length
            (:func:`default_batch_size`). Bounds memory; 1 runs them one at a time.
        progress: Show a tqdm bar over forwards.

    Returns:
        A :class:`PatchingSweep`: ``.values``, ``.table``, ``.figure()``.

    Raises:
        ValueError: prompts of different lengths, an unknown hook (or one the family lacks),
            bad positions or batch size, a metric that is not a scalar.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> sweep = residkit.patching_sweep(model, "The cat sat", "The dog sat",
        ...     lambda logits: logits[0, -1, 5], hook="attn_out", progress=False)
        >>> sweep.values.shape, sweep.table.columns.tolist()
        (torch.Size([4, 12]), ['layer', 'pos', 'token', 'value'])
    """
    clean_t, corrupt_t = _pair(model, clean, corrupted, hook)
    spec, n, n_pos = spec_for(model), model.cfg.n_layers, clean_t.shape[1]
    points = [spec.patch_hook(hook, layer) for layer in range(n)]
    pos_list = list(range(n_pos)) if positions is None else check_positions("positions", positions)
    bad = [p for p in pos_list if not 0 <= p < n_pos]
    if not pos_list or bad:
        raise ValueError(
            f"positions {bad or pos_list} invalid for a prompt of {n_pos} tokens (use 0..{n_pos - 1})"
        )
    heads = list(range(model.cfg.n_heads)) if hook == "z" else [None]
    cells = [(j, p, h) for j, p in enumerate(pos_list) for h in heads]
    if batch_size is None:
        batch_size = default_batch_size(model, n_pos, len(cells))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    corrupt_resid = capture_residuals(model, corrupt_t, layers=range(n))
    clean_acts = (
        capture_residuals(model, clean_t, layers=range(n))
        if hook == "resid_pre"
        else _capture(model, clean_t, points)
    )
    shape = (n, len(pos_list), len(heads)) if hook == "z" else (n, len(pos_list))
    values = torch.zeros(shape, dtype=torch.float32)
    # Equal chunks: 16 runs at a bound of 14 go as 8 + 8, not 14 + 2.
    size = -(-len(cells) // -(-len(cells) // batch_size))
    chunks = [cells[i : i + size] for i in range(0, len(cells), size)]
    block_runs = 0
    bar = tqdm(total=n * len(chunks), desc=f"patching {hook}", disable=not progress)
    with bar:
        for layer in range(n):
            for chunk in chunks:
                logits = _patched_forward(
                    model, corrupt_t, corrupt_resid[layer], clean_acts[layer], layer, hook, chunk
                )
                block_runs += (n - layer) * len(chunk)
                for row, (j, _, h) in enumerate(chunk):
                    value = metric(logits[row : row + 1])
                    if not isinstance(value, Tensor) or value.numel() != 1:
                        raise ValueError(
                            "metric must return a scalar tensor for one run's logits "
                            f"[1, pos, vocab], got {value!r:.80}"
                        )
                    values[(layer, j, h) if hook == "z" else (layer, j)] = value.item()
                bar.update()
    return PatchingSweep(
        values=values,
        hook=hook,
        positions=tuple(pos_list),
        str_tokens=tuple(str(t) for t in model.to_str_tokens(clean_t[0][pos_list])),
        batch_size=size,
        n_forwards=2 + n * len(chunks),
        block_runs=block_runs,
    )


@entry
@torch.no_grad()
def patched_logits(
    model: TransformerBridge,
    clean: Inputs,
    corrupted: Inputs,
    *,
    hook: str = "resid_pre",
    layer: int,
    pos: int,
    head: int | None = None,
) -> Float[Tensor, "1 pos vocab"]:
    """Logits of one patched run: ``corrupted`` with ``clean``'s activation at one point.

    The run behind cell ``[layer, pos(, head)]`` of :func:`patching_sweep`.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> patched_logits(model, "The cat", "The dog", hook="mlp_out", layer=1, pos=4).shape
        torch.Size([1, 8, 259])
    """
    clean_t, corrupt_t = _pair(model, clean, corrupted, hook)
    n, n_pos = model.cfg.n_layers, clean_t.shape[1]
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer {layer!r} out of range for {n} blocks (use 0..{n - 1})")
    if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < n_pos:
        raise ValueError(f"pos {pos!r} invalid for a prompt of {n_pos} tokens (use 0..{n_pos - 1})")
    if (hook == "z") != (head is not None):
        raise ValueError(
            f"head is needed for hook='z' and only then; got hook={hook!r}, head={head!r}"
        )
    if head is not None and not 0 <= head < model.cfg.n_heads:
        raise ValueError(f"head {head!r} out of range for {model.cfg.n_heads} heads")
    point = spec_for(model).patch_hook(hook, layer)
    start = capture_residuals(model, corrupt_t, layers=[layer])[0]
    clean_act = _capture(model, clean_t, [point])[0]
    return _patched_forward(model, corrupt_t, start, clean_act, layer, hook, [(0, pos, head)])


def _pair(
    model: TransformerBridge, clean: Inputs, corrupted: Inputs, hook: str
) -> tuple[Tensor, Tensor]:
    clean_t, corrupt_t = to_tokens(model, clean), to_tokens(model, corrupted)
    if clean_t.shape != corrupt_t.shape or clean_t.shape[0] != 1:
        raise ValueError(
            f"clean has shape {tuple(clean_t.shape)} but corrupted has {tuple(corrupt_t.shape)}; "
            "activation patching needs one prompt each, of the same token length"
        )
    if hook not in HOOKS:
        raise ValueError(f"hook {hook!r} is not a patching point; choose from {', '.join(HOOKS)}")
    return clean_t, corrupt_t


def _keep(store: list[Tensor], act: Tensor, hook: object) -> None:
    store.append(act.detach().clone())


def _capture(model: TransformerBridge, tokens: Tensor, points: list[str]) -> list[Tensor]:
    stores: list[list[Tensor]] = [[] for _ in points]
    with temporary_hooks(
        model, [(p, partial(_keep, s)) for p, s in zip(points, stores, strict=True)]
    ):
        model(tokens, return_type=None)
    return [s[0] for s in stores]


def _patched_forward(
    model: TransformerBridge,
    tokens: Tensor,
    start: Tensor,
    clean_act: Tensor,
    layer: int,
    hook: str,
    cells: list[tuple[int, int, int | None]],
) -> Tensor:
    """Logits of ``len(cells)`` patched runs in one forward that starts at block ``layer``."""
    batch = len(cells)
    entering = start.expand(batch, -1, -1).clone()
    if hook == "resid_pre":
        for row, (_, pos, _) in enumerate(cells):
            entering[row, pos] = clean_act[0, pos]
    spec = spec_for(model)

    def enter(act: Tensor, hook: object) -> Tensor:
        return entering.to(act.dtype)

    def patch(act: Tensor, hook: object) -> Tensor:
        out = act.clone()
        for row, (_, pos, head) in enumerate(cells):
            index = (row, pos) if head is None else (row, pos, head)
            out[index] = clean_act[(0, pos) if head is None else (0, pos, head)]
        return out

    hooks = [(spec.resid_hook(layer, model.cfg.n_layers), enter)]
    if hook != "resid_pre":
        hooks.append((spec.patch_hook(hook, layer), patch))
    with skipped_blocks(model, layer), temporary_hooks(model, hooks):
        return model(tokens.expand(batch, -1))
