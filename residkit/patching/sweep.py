"""Activation-patching sweeps: every (layer, position[, head]), batched.

:func:`patching_sweep` is the usual activation-patching experiment: one clean activation
(a residual, an attention or MLP output, one head's ``z``) patched into a corrupted run, for
every (layer, position[, head]). A patch at block ``l``, position ``p`` changes nothing below
block ``l`` and, in a causal model, nothing before position ``p``. So no patched run repeats
that part of the corrupted run: runs start at their block and, by default, at their chunk's
first patched position, continuing the corrupted run's cache there; runs of neighbouring
cells share one forward as a batch (:mod:`residkit.patching.chunks` plans them).
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

from residkit._bridge import positionwise_parts, temporary_hooks
from residkit._entry import entry
from residkit._validate import check_positions
from residkit.architectures import spec_for
from residkit.capture import Inputs, capture_residuals, capture_with_logits, to_tokens
from residkit.patching.chunks import Cell, Chunk, Runs, plan, prefix_caches, run_chunk

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

__all__ = ["HOOKS", "PatchingSweep", "patched_logits", "patching_sweep"]

HOOKS: tuple[str, ...] = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z")
"""The points :func:`patching_sweep` patches (``z``: one attention head's output, per head)."""


@dataclass(frozen=True)
class PatchingSweep:
    """What :func:`patching_sweep` measured.

    Attributes:
        values: ``metric`` of each patched run: ``[layer, pos]``, or ``[layer, pos, head]``
            for ``hook="z"``.
        hook: The patching point.
        positions: The token positions patched (the ``pos`` axis).
        str_tokens: The clean prompt's tokens at those positions (what is patched in there).
        batch_size: Patched runs in the largest forward.
        n_forwards: Forwards run: the two capture runs, the pieces of the corrupted prompt
            whose caches later forwards continue, and one per batch of patched runs.
        block_runs: Decoder blocks run, one per batch row: ``n_layers - l`` for a row of a
            forward that starts at block ``l`` (TransformerLens runs ``n_layers`` per cell).
        block_positions: The blocks' work in token positions: each row's blocks times the
            positions its forward runs (TransformerLens: ``n_layers * pos`` per cell).
        reuse_prefix: Whether forwards started at their first patched position.
        mlp_positions: The MLPs' work in token positions. Equal to ``block_positions``
            unless the MLPs ran only where a run's logits depend on them (reused prefixes,
            any hook but ``mlp_out``): from each run's patched block and position on, and at
            the last block where it is unembedded. The query and output projections run
            there too where the bridge allows (``o`` not for ``z``).
        method: ``"exact"`` (patched runs), or ``"attribution"`` / ``"attribution*"`` for the
            first-order estimates of :func:`~residkit.patching.attribution.attribution_sweep`.
        baseline: ``metric`` of the corrupted run itself (what a patch that changes nothing
            gives); a cell's effect is its value minus this.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> metric = lambda logits: logits[0, -1, 5]
        >>> sweep = residkit.patching_sweep(model, "ab", "cd", metric, progress=False)
        >>> sweep.table.shape, sweep.n_forwards, sweep.block_positions
        ((12, 4), 3, 144)

        On a model this small a block call costs more than its arithmetic, so the plan puts
        all 12 runs in one forward (the two capture runs make three). TransformerLens's loop,
        one whole run per cell, does less arithmetic in many more calls:

        >>> whole = residkit.patching_sweep(
        ...     model, "ab", "cd", metric, batch_size=1, reuse_prefix=False, progress=False
        ... )
        >>> whole.n_forwards, whole.block_positions
        (14, 90)
    """

    values: Float[Tensor, "layer pos"] | Float[Tensor, "layer pos head"]
    hook: str
    positions: tuple[int, ...]
    str_tokens: tuple[str, ...]
    batch_size: int
    n_forwards: int
    block_runs: int
    block_positions: int
    reuse_prefix: bool
    mlp_positions: int | None = None
    method: str = "exact"
    baseline: float = float("nan")

    @property
    def effects(self) -> Float[Tensor, "layer pos"] | Float[Tensor, "layer pos head"]:
        """Each cell's value minus :attr:`baseline`: what the patch changed."""
        return self.values - self.baseline

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
    reuse_prefix: bool = True,
    metric_positions: Sequence[int] | None = None,
    progress: bool = True,
) -> PatchingSweep:
    """Activation patching, clean -> corrupted, at every layer and position (and head).

    Entry ``[l, p]`` is ``metric(logits)`` of the corrupted run with the clean run's
    activation at ``hook`` of block ``l``, position ``p``, patched in (``hook="z"``: entry
    ``[l, p, h]``, head ``h``'s ``z`` only). Same quantity as TransformerLens's
    ``get_act_patch_resid_pre``, ``get_act_patch_resid_mid``, ``get_act_patch_attn_out``,
    ``get_act_patch_mlp_out`` and ``get_act_patch_attn_head_out_by_pos``. With
    ``reuse_prefix=False, batch_size=1`` the values are bitwise theirs; otherwise they differ
    by the rounding of GEMMs of other shapes (``docs/patching.md`` gives the measured size).

    Args:
        model: A bridge from :func:`residkit.load`.
        clean: The prompt whose activations are patched in.
        corrupted: The prompt run with one activation replaced; same token length as ``clean``.
        metric: Maps logits ``[1, pos, vocab]`` of one patched run to a scalar tensor.
        hook: ``"resid_pre"``, ``"resid_mid"``, ``"attn_out"``, ``"mlp_out"`` or ``"z"``.
        positions: Positions to patch; default all.
        batch_size: Patched runs per forward at most; default from the model size and each
            forward's positions (logits near 384 MiB). 1 runs them one at a time.
        reuse_prefix: Start each forward at its first patched position, continuing the
            corrupted run's cache there, and unembed each run only from its patch on (the
            positions before a patch are the corrupted run's: the model is causal). False
            runs every position of every run from its patched layer, as TransformerLens does.
        metric_positions: The positions ``metric`` reads (negative ones count from the end;
            ``[-1]`` for a metric on the last token's logits). The unembedding then runs only
            there, and the logits ``metric`` gets hold NaN everywhere else, so a metric reading
            another position gives NaN rather than a wrong number. Default: every position.
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
    pos_list = list(range(n_pos)) if positions is None else check_positions("positions", positions)
    bad = [p for p in pos_list if not 0 <= p < n_pos]
    if not pos_list or bad:
        raise ValueError(
            f"positions {bad or pos_list} invalid for a prompt of {n_pos} tokens (use 0..{n_pos - 1})"
        )
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(reuse_prefix, bool):
        raise TypeError(f"reuse_prefix must be True or False, got {reuse_prefix!r}")
    wanted = None
    if metric_positions is not None:
        asked = check_positions("metric_positions", metric_positions)
        wanted = tuple(sorted({q % n_pos for q in asked if -n_pos <= q < n_pos}))
        if not asked or len(wanted) != len(set(asked)):
            raise ValueError(
                f"metric_positions {list(asked)} invalid for a prompt of {n_pos} tokens "
                f"(use {-n_pos}..{n_pos - 1}, each position once)"
            )
    heads: list[int | None] = list(range(model.cfg.n_heads)) if hook == "z" else [None]
    # Parts acting on each position alone run only where a run's logits depend on them,
    # except a part holding the patch's hook point (module docs of chunks).
    inside = {"mlp_out": "mlp", "z": "o"}.get(hook)
    positionwise = positionwise_parts(model) - {inside} if reuse_prefix else frozenset()
    chunks = plan(model, n_pos, pos_list, heads, batch_size=batch_size, reuse_prefix=reuse_prefix,
                  metric_positions=wanted, positionwise=positionwise)  # fmt: skip
    resid, corrupt_logits = capture_with_logits(model, corrupt_t, list(range(n)))
    points = [spec.patch_hook(hook, layer) for layer in range(n)]
    clean_acts = (
        capture_residuals(model, clean_t, layers=range(n))
        if hook == "resid_pre"
        else _capture(model, clean_t, points)
    )
    starts = sorted({c.start_pos for c in chunks})
    runs = Runs(
        tokens=corrupt_t,
        corrupt_resid=dict(enumerate(resid)),
        corrupt_logits=corrupt_logits,
        clean_acts=dict(enumerate(clean_acts)),
        hook=hook,
        prefixes=prefix_caches(model, corrupt_t, starts),
        ragged_head=reuse_prefix,
        metric_positions=wanted,
        positionwise=positionwise,
    )
    shape = (n, len(pos_list), len(heads)) if hook == "z" else (n, len(pos_list))
    values = torch.zeros(shape, dtype=torch.float32)
    for chunk in tqdm(chunks, desc=f"patching {hook}", disable=not progress):
        for cell, logits in zip(chunk.cells, run_chunk(model, chunk, runs), strict=True):
            value = metric(logits)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(
                    "metric must return a scalar tensor for one run's logits "
                    f"[1, pos, vocab], got {value!r:.80}"
                )
            at = (cell.layer, cell.index, *([] if cell.head is None else [cell.head]))
            values[at] = value.item()
    block_positions = sum(
        (n - c.start_layer) * len(c.cells) * (n_pos - c.start_pos) for c in chunks
    )
    return PatchingSweep(
        values=values,
        hook=hook,
        positions=tuple(pos_list),
        str_tokens=tuple(str(t) for t in model.to_str_tokens(clean_t[0][pos_list])),
        batch_size=max(len(c.cells) for c in chunks),
        # the two capture runs, the corrupted prefix's pieces, one forward per chunk
        n_forwards=2 + len([s for s in starts if s]) + len(chunks),
        block_runs=sum((n - c.start_layer) * len(c.cells) for c in chunks),
        block_positions=block_positions,
        mlp_positions=_needed_work(chunks, n, n_pos, wanted)
        if "mlp" in positionwise
        else block_positions,
        reuse_prefix=reuse_prefix,
        baseline=float(metric(corrupt_logits)),
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

    The run behind cell ``[layer, pos(, head)]`` of :func:`patching_sweep`, run whole from its
    patched layer (every position computed).

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
    runs = Runs(
        tokens=corrupt_t,
        corrupt_resid={layer: capture_residuals(model, corrupt_t, layers=[layer])[0]},
        corrupt_logits=torch.empty(0),
        clean_acts={layer: _capture(model, clean_t, [point])[0]},
        hook=hook,
        prefixes={},
        ragged_head=False,
    )
    (logits,) = run_chunk(model, Chunk(layer, 0, (Cell(layer, 0, pos, head),)), runs)
    return logits


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


def _needed_work(chunks: list[Chunk], n: int, n_pos: int, wanted: tuple[int, ...] | None) -> int:
    """Positions at which positionwise parts run (module docs of chunks): each run's from
    its block and position on, at the last block only where it is unembedded."""
    total = 0
    for c in (cell for chunk in chunks for cell in chunk.cells):
        last = n_pos - c.pos if wanted is None else sum(q >= c.pos for q in wanted)
        total += (n - 1 - c.layer) * (n_pos - c.pos) + last
    return total
