"""How a sweep's patched runs are grouped into forwards, and one such forward.

A patched run differs from the corrupted run only from its patch on. Below the patched layer
nothing changes, and in a causal model nothing changes before the patched position either:
at every layer those positions' residuals, K/V and logits are the corrupted run's. So a
forward holding runs that patch positions ``>= s`` at layers ``>= l`` can start at block
``l`` and position ``s``. It continues the corrupted run from its cache of the first ``s``
tokens, the blocks below ``l`` pass their input through, and the unembedding runs only at
each run's positions from its patch on. The logits before a run's patch are the corrupted
run's own.

Grouping trades arithmetic against calls. Runs of a few neighbouring positions share a start
position: the later it is, the less work. Runs of several neighbouring layers share a
forward: fewer block calls, but a run above the forward's first layer passes through the
blocks in between for nothing, its input put back at its own layer. :func:`plan` picks the
grouping with the fewest modelled FLOPs for the prompt and the model's shapes, counting each
block call's fixed cost (hooks, dispatch) as :data:`BLOCK_CALL_FLOPS`.

Most of a block's arithmetic acts on each position alone: the MLP, and the attention's query
and output projections. A run patched at block ``l``, position ``p`` depends on those only
from block ``l`` on, at positions ``p`` on (and at the last block, only where it is
unembedded): below ``l`` its residual is put back whole, and before ``p`` it is the corrupted
run's, which is put back at every block instead of being computed again. Keys and values are
still needed at every position. So the ``positionwise`` parts run only at those (run,
position) pairs, whatever the grouping, and the planner weighs only the rest of a block
against block calls. A part holding the patch's hook point (the MLP for ``mlp_out``, the
output projection, whose input is ``z``) runs everywhere.

With ``reuse_prefix=False`` every run is a whole run of the prompt from its patched layer
(TransformerLens's loop): one layer per forward, every position, the model's own logits.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import (
    cached_forward,
    head_at,
    n_kv_heads,
    new_cache,
    positionwise_at,
    repeated_cache,
    skipped_blocks,
    temporary_hooks,
)
from residkit.architectures import spec_for

__all__ = [
    "BLOCK_CALL_FLOPS",
    "Cell",
    "Chunk",
    "Runs",
    "default_rows",
    "plan",
    "prefix_caches",
    "run_chunk",
]

BLOCK_CALL_FLOPS = 3e8
"""Fixed cost of one block call, in FLOPs of arithmetic: reading the block's weights once, and
the bridge's hook points and dispatch, expressed as the GEMM work that takes as long. Fitted on
a 2-core CPU with ``benchmarks/patching.py`` (the candidates and their sweep times are in
``benchmarks/RESULTS.md``); other hardware may prefer another value."""

# Bytes of activations and logits one forward may hold: the logits dominate (pos x vocab per
# row), so the default rows per forward keep them near this bound whatever the vocabulary.
_BATCH_BYTES = 384 * 2**20
_MAX_ROWS = 256


@dataclass(frozen=True)
class Cell:
    """One patched run: patch at block ``layer``, position ``pos`` (``index`` into the
    sweep's positions), one head's ``z`` if ``head`` is set."""

    layer: int
    index: int
    pos: int
    head: int | None = None


@dataclass(frozen=True)
class Chunk:
    """Patched runs that go through one forward, starting at block ``start_layer`` and
    position ``start_pos`` (every cell's layer and position are at or above them)."""

    start_layer: int
    start_pos: int
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class Runs:
    """What every chunk of one sweep reads: the corrupted run and the clean activations."""

    tokens: Tensor  # the corrupted prompt, [1, pos]
    corrupt_resid: dict[int, Tensor]  # block -> the residual entering it, [1, pos, d_model]
    corrupt_logits: Tensor  # [1, pos, vocab]
    clean_acts: dict[int, Tensor]  # block -> the clean activation at its patching point
    hook: str
    prefixes: dict[int, Any]  # start position -> the corrupted run's cache of that many tokens
    ragged_head: bool  # unembed only at each run's positions from its patch on
    metric_positions: tuple[int, ...] | None = None  # unembed only there (others: NaN)
    positionwise: frozenset[str] = frozenset()  # parts run where logits depend on them


def _flops_per_position(model: TransformerBridge, n_pos: int) -> tuple[dict[str, float], float]:
    """GEMM FLOPs per position of a forward: of one block's parts (``"kv"``: key and value
    projections and attention scores; ``"q"``, ``"o"``, ``"mlp"``), and of the unembedding."""
    cfg = model.cfg
    d, heads, d_head = cfg.d_model, cfg.n_heads, cfg.d_head
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * d
    projection = 2.0 * d * heads * d_head
    parts = {
        "kv": 4.0 * d * n_kv_heads(model) * d_head + 4.0 * heads * d_head * n_pos,
        "q": projection,
        "o": projection,
        "mlp": (3 if spec_for(model).gated_mlp else 2) * 2.0 * d * d_mlp,
    }
    return parts, float(2 * d * cfg.d_vocab)


def default_rows(model: TransformerBridge, n_tokens: int, logits: bool = True) -> int:
    """Runs per forward of ``n_tokens`` positions: logits (unless only a few positions are
    unembedded) and widest activations near 384 MiB."""
    cfg = model.cfg
    width = cfg.d_vocab * logits + 4 * max(cfg.d_model, getattr(cfg, "d_mlp", None) or cfg.d_model)
    return max(1, min(_MAX_ROWS, _BATCH_BYTES // (n_tokens * width * 4)))


def _equal_parts(items: list[Any], parts: int) -> list[list[Any]]:
    """``items`` cut into ``parts`` contiguous pieces whose sizes differ by at most one."""
    q, r = divmod(len(items), parts)
    out, i = [], 0
    for k in range(parts):
        size = q + (k < r)
        out.append(items[i : i + size])
        i += size
    return out


def plan(
    model: TransformerBridge,
    n_pos: int,
    positions: list[int],
    heads: list[int | None],
    *,
    batch_size: int | None,
    reuse_prefix: bool,
    metric_positions: tuple[int, ...] | None = None,
    positionwise: frozenset[str] = frozenset(),
) -> list[Chunk]:
    """The chunks of a sweep over every layer, ``positions`` and ``heads`` (see module docs).

    ``batch_size`` bounds the runs in any chunk; None picks a bound from the model size and
    each chunk's positions (:func:`default_rows`). With ``metric_positions`` only those
    positions are unembedded, which the cost model and the bound count. The work of the
    ``positionwise`` parts is the same under every grouping (module docs), so only the rest
    of a block counts.
    """
    n = model.cfg.n_layers
    mp = metric_positions

    def unembedded(p: int) -> int:
        return n_pos - p if mp is None else sum(q >= p for q in mp)

    def default(tokens: int) -> int:
        return default_rows(model, tokens, logits=mp is None)

    if not reuse_prefix:
        cap = batch_size or min(default(n_pos), len(positions) * len(heads))
        cells = [(j, p, h) for j, p in enumerate(positions) for h in heads]
        per_layer = _equal_parts(cells, -(-len(cells) // cap))
        return [
            Chunk(layer, 0, tuple(Cell(layer, *cell) for cell in part))
            for layer in range(n)
            for part in per_layer
        ]
    f_parts, f_head = _flops_per_position(model, n_pos)
    f_block = sum(f for part, f in f_parts.items() if part not in positionwise)

    def cap_for(start: int) -> int:
        return batch_size or default(n_pos - start)

    # A unit is one position's runs in one layer (its heads, cut to fit the bound).
    units: list[tuple[int, int, list[int | None]]] = []
    for j, p in enumerate(positions):
        step = min(len(heads), cap_for(p))
        units += [(j, p, heads[i : i + step]) for i in range(0, len(heads), step)]

    def group_plan(group: list[tuple[int, int, list[int | None]]]) -> tuple[float, int]:
        start = min(p for _, p, _ in group)
        tokens = n_pos - start
        rows = sum(len(hs) for _, _, hs in group)
        kept = sum(unembedded(p) * len(hs) for _, p, hs in group)
        best: tuple[float, int] | None = None
        for width in range(1, min(n, cap_for(start) // rows) + 1):
            cost = 0.0
            for low in range(0, n, width):
                layers = min(n, low + width) - low
                work = rows * layers * tokens * f_block + BLOCK_CALL_FLOPS
                cost += (n - low) * work + kept * layers * f_head
            if best is None or cost < best[0]:
                best = (cost, width)
        return best if best is not None else (float("inf"), 1)

    # Any number of groups could be best. Tried: every count up to 16, the 16 from the
    # fewest that fit the bound, powers of two, and one unit per group (which always fits);
    # that keeps planning cheap on long prompts.
    fewest = -(-sum(len(hs) for _, _, hs in units) // cap_for(0))
    counts = {*range(1, 17), *range(fewest, fewest + 16), *(2**i for i in range(16)), len(units)}
    choice: tuple[float, list[tuple[list[Any], int]]] | None = None
    for k in sorted(k for k in counts if k <= len(units)):
        groups = _equal_parts(units, k)
        planned = [group_plan(g) for g in groups]
        total = sum(cost for cost, _ in planned)
        if total < float("inf") and (choice is None or total < choice[0]):
            choice = (total, [(g, w) for g, (_, w) in zip(groups, planned, strict=True)])
    assert choice is not None
    return [
        Chunk(
            low,
            min(p for _, p, _ in group),
            tuple(
                Cell(layer, j, p, h)
                for layer in range(low, min(n, low + width))
                for j, p, hs in group
                for h in hs
            ),
        )
        for group, width in choice[1]
        for low in range(0, n, width)
    ]


@torch.no_grad()
def prefix_caches(model: TransformerBridge, tokens: Tensor, starts: list[int]) -> dict[int, Any]:
    """The corrupted run's cache after its first ``s`` tokens, for each ``s`` in ``starts``
    (one cached forward of the prompt, in pieces cut at those positions)."""
    caches: dict[int, Any] = {}
    cache, done = new_cache(model), 0
    for start in sorted(set(starts) - {0}):
        cached_forward(model, tokens[:, done:start], cache, return_type=None)
        caches[start], done = copy.deepcopy(cache), start
    return caches


def _needed_positions(
    cells: tuple[Cell, ...], after_patch: Tensor, low: int, n: int, head: Tensor, device: Any
) -> dict[int, Tensor]:
    """Flat (row, position) indices where each block's output is read (module docs): rows
    patched at or below the block, from their patch on; at the last block, where the head
    reads (``head``). Blocks whose output is read everywhere are left out."""
    rows, span = after_patch.shape
    flat = torch.arange(rows * span).reshape(rows, span)
    out = {}
    for layer in range(low, n):
        if layer == n - 1:
            at = head
        else:
            mask = after_patch & torch.tensor([c.layer <= layer for c in cells])[:, None]
            at = flat[mask]
        if len(at) < rows * span:
            out[layer] = at.to(device)
    return out


def run_chunk(model: TransformerBridge, chunk: Chunk, runs: Runs) -> Iterator[Tensor]:
    """The logits ``[1, pos, vocab]`` of each of ``chunk``'s runs, in order."""
    spec, n = spec_for(model), model.cfg.n_layers
    cells, low, start = chunk.cells, chunk.start_layer, chunk.start_pos
    rows = len(cells)
    layers = sorted({c.layer for c in cells})
    by_layer = {layer: [r for r, c in enumerate(cells) if c.layer == layer] for layer in layers}

    tokens = runs.tokens[:, start:].expand(rows, -1)
    span, n_pos = tokens.shape[1], runs.tokens.shape[1]
    first = torch.tensor([c.pos - start for c in cells])  # each run's patch, in the forward
    cell_layer = torch.tensor([c.layer for c in cells])
    after_patch = torch.arange(span)[None, :] >= first[:, None]  # [rows, span]

    def put_resid(layer: int, act: Tensor) -> Tensor:
        # Rows patched above this layer get the corrupted residual here (the blocks below it
        # ran them for nothing), and so do positions before a row's patch, which are the
        # corrupted run's (and, with positionwise parts, were not computed); a resid_pre
        # patch goes in on top.
        out = runs.corrupt_resid[layer][:, start:].expand(rows, -1, -1).clone()
        if layer != low:
            own = ((cell_layer < layer)[:, None] & after_patch).to(act.device)
            out = torch.where(own[..., None], act.to(out.dtype), out)
        if runs.hook == "resid_pre":
            clean = runs.clean_acts[layer]
            for r in by_layer.get(layer, []):
                out[r, cells[r].pos - start] = clean[0, cells[r].pos]
        return out.to(act.dtype)

    def patch(layer: int, act: Tensor) -> Tensor:
        out, clean = act.clone(), runs.clean_acts[layer]
        for r in by_layer[layer]:
            c = cells[r]
            at = (r, c.pos - start) if c.head is None else (r, c.pos - start, c.head)
            out[at] = clean[(0, c.pos) if c.head is None else (0, c.pos, c.head)]
        return out

    gathered = bool(runs.positionwise)
    hooks: list[tuple[str, Any]] = [
        (spec.resid_hook(layer, n), lambda act, hook, layer=layer: put_resid(layer, act))
        for layer in (range(low, n) if gathered else sorted({low, *layers}))
    ]
    if runs.hook != "resid_pre":
        hooks += [
            (spec.patch_hook(runs.hook, layer), lambda act, hook, layer=layer: patch(layer, act))
            for layer in layers
        ]
    wanted = runs.metric_positions
    # Positions each run unembeds itself; the rest are the corrupted run's (before its patch,
    # where the model is causal) or NaN (outside metric_positions: the metric must not read them).
    own = [
        [
            q
            for q in (range(n_pos) if wanted is None else wanted)
            if q >= (c.pos if runs.ragged_head else 0)
        ]
        for c in cells
    ]
    ragged = runs.ragged_head or wanted is not None
    head: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    keep = torch.tensor(
        [r * span + q - start for r, qs in enumerate(own) for q in qs], dtype=torch.long
    )
    if ragged:
        head = head_at(model, keep.to(tokens.device))
    parts: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if gathered:
        at = _needed_positions(cells, after_patch, low, n, keep, tokens.device)
        parts = positionwise_at(model, at, runs.positionwise)
    with skipped_blocks(model, low), temporary_hooks(model, hooks), head, parts:
        if start:
            logits = cached_forward(model, tokens, repeated_cache(runs.prefixes[start], rows))
        else:
            logits = model(tokens)
    if not ragged:
        yield from (logits[r : r + 1] for r in range(rows))
        return
    offset = 0
    for c, qs in zip(cells, own, strict=True):
        mine = logits[:, offset : offset + len(qs)]
        offset += len(qs)
        if wanted is None and runs.ragged_head:
            yield torch.cat([runs.corrupt_logits[:, : c.pos], mine], dim=1) if c.pos else mine
            continue
        full = torch.full((1, n_pos, logits.shape[-1]), float("nan"), dtype=logits.dtype)
        full = full.to(logits.device)
        before = [q for q in wanted or () if q not in qs]
        full[:, before] = runs.corrupt_logits[:, before].to(logits.dtype)
        full[:, qs] = mine
        yield full
