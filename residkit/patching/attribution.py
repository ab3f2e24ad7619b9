"""Attribution patching: every cell of an activation-patching sweep from one backward pass.

Patching the clean activation ``a_clean`` into the corrupted run at one point changes the
metric by ``m(corrupted with a_clean there) - m(corrupted)``. Attribution patching (Nanda 2023;
Syed et al. 2023) estimates that change to first order around the corrupted run:

    m(patched) ~= m(corrupted) + (a_clean - a_corrupted) . dm/da |corrupted

One clean forward gives every ``a_clean``, one corrupted forward and backward give every
``a_corrupted`` and gradient, so the whole sweep costs about three forwards, where the exact
sweep (:func:`~residkit.patching.patching_sweep`) runs a forward per cell. The estimate is
wrong where ``m`` is far from linear in the activation between the two runs: where attention
saturates (softmax flat near 0 or 1) or a cell's effect is large (Kramár et al. 2024, "AtP*");
``correction="qk"`` applies AtP*'s fix for the first (:mod:`residkit.patching.qk_fix`).
:func:`~residkit.patching.compare.compare_sweeps` measures how wrong, cell by cell, against the
exact sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import temporary_hooks
from residkit._entry import entry
from residkit._validate import choice
from residkit.architectures import spec_for
from residkit.capture import Inputs, to_tokens
from residkit.patching.sweep import HOOKS, PatchingSweep

__all__ = ["CORRECTIONS", "attribution_sweep", "gradients_at"]

CORRECTIONS: tuple[str, ...] = ("none", "qk")
"""``"none"``: plain attribution patching. ``"qk"``: AtP*'s exact attention-pattern change at
the patched block (:mod:`residkit.patching.qk_fix`; ``hook="resid_pre"`` only)."""


def _points(model: TransformerBridge, hook: str) -> list[str]:
    spec, n = spec_for(model), model.cfg.n_layers
    if hook == "resid_pre":  # the point patching_sweep replaces: the residual entering block l
        return [spec.resid_hook(layer, n) for layer in range(n)]
    return [spec.patch_hook(hook, layer) for layer in range(n)]


def _pair(model: TransformerBridge, clean: Inputs, corrupted: Inputs) -> tuple[Tensor, Tensor]:
    clean_t, corrupt_t = to_tokens(model, clean), to_tokens(model, corrupted)
    if clean_t.shape != corrupt_t.shape:
        raise ValueError(
            f"clean has shape {tuple(clean_t.shape)} but corrupted has {tuple(corrupt_t.shape)}; "
            "each clean prompt needs a corrupted one of the same token length"
        )
    return clean_t, corrupt_t


def _per_row(value: Any, batch: int) -> Tensor:
    """The metric's value as ``[batch]``: a scalar (batch 1) or one value per pair."""
    if not isinstance(value, Tensor) or value.numel() != batch:
        raise ValueError(
            f"metric must return one value per prompt pair ({batch}; a scalar for one pair) "
            f"from logits [batch, pos, vocab], got {value!r:.80}"
        )
    return value.reshape(batch)


def gradients_at(
    model: TransformerBridge,
    tokens: Tensor,
    points: list[str],
    metric: Callable[[Tensor], Tensor],
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """One forward and backward of ``tokens``: the activation at each hook point, ``metric``'s
    gradient there (summed over the batch's metric values, so row ``b`` gets its own pair's
    gradient), and the metric per row."""
    acts: list[Tensor] = []
    zeros: list[Tensor] = []

    def keep(act: Tensor, hook: Any) -> Tensor:
        # The gradient is taken with respect to a zero added to the hook's output, not to the
        # activation tensor itself: a bridge may use the tensor before its hook elsewhere (the
        # residual add around a hooked resid_mid), and a patch replaces only the hook's output.
        zero = torch.zeros_like(act, requires_grad=True)
        acts.append(act.detach())
        zeros.append(zero)
        return act + zero

    with torch.enable_grad(), temporary_hooks(model, [(p, keep) for p in points]):
        logits = model(tokens)
        values = _per_row(metric(logits), tokens.shape[0])
        found = torch.autograd.grad(values.sum(), zeros, allow_unused=True)
    grads = [torch.zeros_like(z) if g is None else g for z, g in zip(zeros, found, strict=True)]
    return acts, [g.detach() for g in grads], values.detach()


@entry
def attribution_sweep(
    model: TransformerBridge,
    clean: Inputs,
    corrupted: Inputs,
    metric: Callable[[Tensor], Tensor],
    *,
    hook: str = "resid_pre",
    correction: str = "none",
) -> PatchingSweep:
    """First-order estimate of :func:`~residkit.patching.patching_sweep`, every cell at once.

    Entry ``[l, p]`` (``[l, p, h]`` for ``hook="z"``) estimates ``metric`` of the corrupted run
    with the clean activation at ``hook`` of block ``l``, position ``p`` patched in: the
    corrupted run's metric plus ``(a_clean - a_corrupted) . dmetric/da`` there (see the module
    docstring). With several prompt pairs (equal-length batches of clean and corrupted
    prompts), each pair gets its own estimate and the values are their mean.

    Args:
        model: A bridge from :func:`residkit.load`.
        clean: The prompt(s) whose activations are patched in.
        corrupted: The prompt(s) patched; the same token shape as ``clean``.
        metric: Maps logits ``[batch, pos, vocab]`` to one value per pair (``[batch]``; a
            scalar for one pair). It must be differentiable: logits in, no ``.item()``.
        hook: ``"resid_pre"``, ``"resid_mid"``, ``"attn_out"``, ``"mlp_out"`` or ``"z"``.
        correction: One of :data:`CORRECTIONS` (``"qk"`` with ``hook="resid_pre"`` only).

    Returns:
        A :class:`~residkit.patching.PatchingSweep` with ``method="attribution"`` (or
        ``"attribution*"`` with the correction), comparable cell by cell with the exact sweep's.

    Raises:
        ValueError: prompts of other shapes, an unknown hook or correction, a metric that does
            not give one value per pair, ``"qk"`` on a family whose scores are not
            ``scale * q . k`` of its hooks.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> metric = lambda logits: logits[0, -1, 5] - logits[0, -1, 6]
        >>> est = residkit.attribution_sweep(model, "The cat sat", "The dog sat", metric)
        >>> est.values.shape, est.method, est.n_forwards
        (torch.Size([4, 12]), 'attribution', 2)
    """
    choice("hook", hook, HOOKS)
    choice("correction", correction, CORRECTIONS)
    if correction == "qk" and hook != "resid_pre":
        raise ValueError(f"correction='qk' applies to hook='resid_pre' only, not hook={hook!r}")
    clean_t, corrupt_t = _pair(model, clean, corrupted)
    points = _points(model, hook)
    clean_acts: list[Tensor] = []
    store = lambda act, hook: clean_acts.append(act.detach().clone())  # noqa: E731
    with torch.no_grad(), temporary_hooks(model, [(p, store) for p in points]):
        model(clean_t, return_type=None)
    acts, grads, base = gradients_at(model, corrupt_t, points, metric)
    diffs = [c.to(a.dtype) - a for c, a in zip(clean_acts, acts, strict=True)]
    # [batch, pos, d] -> [batch, pos]; z: [batch, pos, head, d_head] -> [batch, pos, head]
    per_cell = torch.stack([(d * g).float().sum(-1) for d, g in zip(diffs, grads, strict=True)])
    if correction == "qk":
        from residkit.patching.qk_fix import qk_terms

        linear, exact = qk_terms(model, clean_t, corrupt_t, metric, _per_row)
        per_cell = per_cell - linear + exact
    values: Float[Tensor, "layer batch ..."] = per_cell + base.float().reshape(
        1, -1, *([1] * (per_cell.ndim - 2))
    )
    n_layers, batch, n_pos = model.cfg.n_layers, corrupt_t.shape[0], corrupt_t.shape[1]
    return PatchingSweep(
        values=values.mean(dim=1).cpu(),
        hook=hook,
        positions=tuple(range(n_pos)),
        str_tokens=tuple(str(t) for t in model.to_str_tokens(clean_t[0])),
        batch_size=batch,
        n_forwards=2,  # one clean, one corrupted (and its backward)
        block_runs=2 * n_layers * batch,
        block_positions=2 * n_layers * batch * n_pos,
        reuse_prefix=False,
        method="attribution*" if correction == "qk" else "attribution",
        baseline=float(base.float().mean()),
    )
