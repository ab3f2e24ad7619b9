"""Patching the whole residual stream, or some positions of it, before one block.

:func:`patch_residual` replaces the residual entering block ``l`` (all positions, or some).
With every position replaced, the blocks below ``l`` cannot matter, so residkit does not run
them (:func:`residkit._bridge.skipped_blocks`). :func:`run_patched_to_final` stops such a run
at the final norm, for callers that compare final residuals (:func:`residkit.markov_test`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import skipped_blocks, temporary_hooks
from residkit._entry import entry
from residkit._validate import check_positions
from residkit.architectures import spec_for
from residkit.capture import Inputs, check_layer, to_tokens

__all__ = ["patch_residual", "run_patched", "run_patched_to_final"]


@entry
@torch.no_grad()
def patch_residual(
    model: TransformerBridge,
    prompt: Inputs,
    residual: Float[Tensor, "batch pos d_model"],
    *,
    layer: int,
    positions: Sequence[int] | None = None,
) -> Float[Tensor, "batch pos vocab"]:
    """Run ``prompt`` with the residual before block ``layer`` replaced by ``residual``.

    Args:
        model: A bridge from :func:`residkit.load`.
        prompt: The prompt to run (its tokens fix the sequence length).
        residual: Replacement residual, same ``[batch, pos]`` as the tokens of ``prompt``.
        layer: ``0..n_layers``; ``n_layers`` patches the final residual (before the last norm).
        positions: Patch only these positions; default all. With all positions the blocks
            below ``layer`` are skipped, since their output is discarded.

    Returns:
        The logits of the patched run.

    Raises:
        ValueError: layer out of range, residual of the wrong shape, bad positions, empty prompt.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> src = residkit.capture_residuals(model, "abcd", layers=[2])[0]
        >>> torch.equal(patch_residual(model, "wxyz", src, layer=2), model("abcd"))
        True
    """
    layer = check_layer(model, layer)
    tokens = to_tokens(model, prompt)
    expected = (*tokens.shape, model.cfg.d_model)
    if not isinstance(residual, Tensor) or not residual.is_floating_point():
        raise TypeError(f"residual must be a float tensor, got {residual!r:.80}")
    if residual.ndim == 2:
        residual = residual.unsqueeze(0)
    if tuple(residual.shape) != expected:
        raise ValueError(
            f"residual has shape {tuple(residual.shape)} but the prompt needs "
            f"[batch, pos, d_model] = {list(expected)}"
        )
    if positions is not None:
        positions = check_positions("positions", positions)
        bad = [p for p in positions if not -tokens.shape[1] <= p < tokens.shape[1]]
        if not positions or bad:
            raise ValueError(
                f"positions {bad or positions} invalid for a prompt of {tokens.shape[1]} tokens"
            )
    return run_patched(model, tokens, residual, layer, positions)


def run_patched(
    model: TransformerBridge,
    tokens: Tensor,
    residual: Tensor,
    layer: int,
    positions: list[int] | None = None,
) -> Tensor:
    """:func:`patch_residual` after its checks (for callers that checked already)."""
    replacement = residual.to(model.cfg.device)

    def patch(act: Tensor, hook: object) -> Tensor:
        if positions is None:
            return replacement.to(act.dtype).clone()
        out = act.clone()
        out[:, positions] = replacement[:, positions].to(act.dtype)
        return out

    spec = spec_for(model)
    with (
        skipped_blocks(model, layer if positions is None else 0),
        temporary_hooks(model, [(spec.resid_hook(layer, model.cfg.n_layers), patch)]),
    ):
        return model(tokens)


class _FinalResidual(Exception):
    """The patched run has reached the final norm: its residual is all the caller wants."""

    def __init__(self, resid: Tensor) -> None:
        super().__init__()
        self.resid = resid


def run_patched_to_final(
    model: TransformerBridge, tokens: Tensor, residual: Tensor, layer: int
) -> Float[Tensor, "batch pos d_model"]:
    """The final residual (entering the last norm) of ``tokens`` with the residual before
    block ``layer`` replaced whole; blocks below ``layer`` and the head (final norm and
    unembedding) do not run."""
    spec, n = spec_for(model), model.cfg.n_layers
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} has no blocks above it to run (0 <= layer < {n})")
    replacement = residual.to(model.cfg.device)

    def patch(act: Tensor, hook: object) -> Tensor:
        return replacement.to(act.dtype).clone()

    def stop(act: Tensor, hook: object) -> None:
        raise _FinalResidual(act.detach())

    hooks = [(spec.resid_hook(layer, n), patch), (spec.final_resid_hook, stop)]
    try:
        with skipped_blocks(model, layer), temporary_hooks(model, hooks):
            model(tokens)
    except _FinalResidual as done:
        return done.resid
    raise RuntimeError(f"the forward never reached {spec.final_resid_hook!r}")
