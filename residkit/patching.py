"""Residual patching: replace the residual stream before a block, and activation-patching sweeps.

:func:`patch_residual` replaces the residual entering block ``l`` (all positions, or some).
With every position replaced, the blocks below ``l`` cannot matter, so residkit does not run
them (:func:`residkit._bridge.skipped_blocks`). :func:`patching_sweep` is the usual
activation-patching experiment: a clean residual patched into a corrupted run, one (layer,
position) at a time.
"""

from collections.abc import Callable, Sequence

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import skipped_blocks, temporary_hooks
from residkit._entry import entry
from residkit._validate import check_positions
from residkit.architectures import spec_for
from residkit.capture import Inputs, capture_residuals, check_layer, to_tokens

__all__ = ["patch_residual", "patching_heatmap", "patching_sweep"]


@entry
@torch.no_grad()
def patch_residual(
    model: TransformerBridge,
    inputs: Inputs,
    residual: Float[Tensor, "batch pos d_model"],
    *,
    layer: int,
    positions: Sequence[int] | None = None,
) -> Float[Tensor, "batch pos vocab"]:
    """Run ``inputs`` with the residual before block ``layer`` replaced by ``residual``.

    Args:
        model: A bridge from :func:`residkit.load`.
        inputs: The prompt to run (its tokens fix the sequence length).
        residual: Replacement residual, same ``[batch, pos]`` as the tokens of ``inputs``.
        layer: ``0..n_layers``; ``n_layers`` patches the final residual (before the last norm).
        positions: Patch only these positions; default all. With all positions the blocks
            below ``layer`` are skipped, since their output is discarded.

    Returns:
        The logits of the patched run.

    Raises:
        ValueError: layer out of range, residual of the wrong shape, bad positions, empty prompt.

    Example:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> src = residkit.capture_residuals(model, "abcd", layers=[2])[0]
        >>> torch.equal(patch_residual(model, "wxyz", src, layer=2), model("abcd"))
        True
    """
    n = model.cfg.n_layers
    layer = check_layer(model, layer)
    tokens = to_tokens(model, inputs)
    expected = (*tokens.shape, model.cfg.d_model)
    if not isinstance(residual, Tensor) or not residual.is_floating_point():
        raise TypeError(f"residual must be a float tensor, got {residual!r:.80}")
    if residual.ndim == 2:
        residual = residual.unsqueeze(0)
    if tuple(residual.shape) != expected:
        raise ValueError(
            f"residual has shape {tuple(residual.shape)} but the inputs need "
            f"[batch, pos, d_model] = {list(expected)}"
        )
    if positions is not None:
        positions = check_positions("positions", positions)
        bad = [p for p in positions if not -tokens.shape[1] <= p < tokens.shape[1]]
        if not positions or bad:
            raise ValueError(
                f"positions {bad or positions} invalid for a prompt of {tokens.shape[1]} tokens"
            )
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
        temporary_hooks(model, [(spec.resid_hook(layer, n), patch)]),
    ):
        return model(tokens)


@entry
@torch.no_grad()
def patching_sweep(
    model: TransformerBridge,
    clean: Inputs,
    corrupted: Inputs,
    metric: Callable[[Tensor], Tensor],
    *,
    progress: bool = True,
) -> Float[Tensor, "layer pos"]:
    """Standard activation patching of ``resid_pre``: clean -> corrupted, per layer and position.

    Entry ``[l, p]`` is ``metric(logits)`` of the corrupted run with the clean residual patched
    in at block ``l``'s input, position ``p`` only. Matches
    ``transformer_lens.patching.get_act_patch_resid_pre`` (tested to 1e-6). Each run starts
    at layer ``l`` from the corrupted residual with position ``p`` swapped in, so blocks below
    ``l`` are not recomputed (exact, by the Markov property).

    Args:
        model: A bridge from :func:`residkit.load`.
        clean, corrupted: Prompts of the same token length.
        metric: Maps logits ``[batch, pos, vocab]`` to a scalar tensor.
        progress: Show a tqdm bar over layers.

    Returns:
        ``[n_layers, pos]`` metric values; plot with :func:`patching_heatmap`.
    """
    clean_t, corrupt_t = to_tokens(model, clean), to_tokens(model, corrupted)
    if clean_t.shape != corrupt_t.shape:
        raise ValueError(
            f"clean has shape {tuple(clean_t.shape)} but corrupted has {tuple(corrupt_t.shape)}; "
            "activation patching needs prompts of the same token length"
        )
    n, n_pos = model.cfg.n_layers, clean_t.shape[1]
    clean_resid = capture_residuals(model, clean_t, layers=range(n))
    corrupt_resid = capture_residuals(model, corrupt_t, layers=range(n))
    out = torch.zeros(n, n_pos, dtype=torch.float32)
    for layer in tqdm(range(n), desc="patching sweep", disable=not progress):
        for pos in range(n_pos):
            mixed = corrupt_resid[layer].clone()
            mixed[:, pos] = clean_resid[layer][:, pos]
            out[layer, pos] = metric(patch_residual(model, corrupt_t, mixed, layer=layer)).item()
    return out


def patching_heatmap(
    sweep: Float[Tensor, "layer pos"],
    *,
    str_tokens: Sequence[str] | None = None,
    title: str = "resid_pre activation patching",
) -> go.Figure:
    """Heatmap of a :func:`patching_sweep` result (layer x position)."""
    labels = [f"{i}:{t}" for i, t in enumerate(str_tokens)] if str_tokens else None
    fig = go.Figure(
        go.Heatmap(
            z=sweep.cpu().numpy(),
            x=labels,
            colorscale="RdBu",
            zmid=0.0,
            hovertemplate="layer %{y}<br>pos %{x}<br>metric %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(title=title, xaxis_title="position", yaxis_title="layer")
    fig.update_yaxes(autorange="reversed")
    return fig
