"""Capturing the residual stream at every layer.

The residual before block ``l`` is ``blocks.{l}.hook_resid_pre``; after the last block it is
the input of the final norm (``ln_final.hook_in``). :func:`capture_residuals` stacks them into
one ``[layer, batch, pos, d_model]`` tensor with ``n_layers + 1`` layers.
"""

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import temporary_hooks
from residkit.architectures import spec_for

__all__ = ["Inputs", "capture_residuals", "check_layers", "to_tokens"]

Inputs = str | Sequence[str] | Tensor
"""A prompt, a list of prompts, or token ids ``[batch, pos]`` / ``[pos]``."""


def to_tokens(model: TransformerBridge, inputs: Inputs) -> Int[Tensor, "batch pos"]:
    """Token ids for ``inputs`` on the model's device, always 2-D.

    Strings go through ``model.to_tokens`` (which prepends BOS where the model's tokenizer
    expects it). A list of strings of different token lengths is right-padded by the bridge.

    Raises:
        ValueError: empty prompt, empty list, float tensor, or tensor of more than 2 dims.
    """
    if isinstance(inputs, Tensor):
        if inputs.is_floating_point():
            raise ValueError(f"token tensor must be integer, got dtype {inputs.dtype}")
        tokens = inputs.unsqueeze(0) if inputs.ndim == 1 else inputs
        if tokens.ndim != 2:
            raise ValueError(
                f"token tensor must be [batch, pos] or [pos], got shape {tuple(inputs.shape)}"
            )
    else:
        prompts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not prompts:
            raise ValueError("inputs is an empty list of prompts")
        if any(not isinstance(p, str) for p in prompts):
            raise ValueError("inputs must be a string, a list of strings or a token tensor")
        if any(p == "" for p in prompts):
            raise ValueError("empty prompt: residkit needs at least one character of text")
        tokens = model.to_tokens(prompts if len(prompts) > 1 else prompts[0])
    if tokens.shape[-1] == 0 or tokens.shape[0] == 0:
        raise ValueError(f"empty token tensor of shape {tuple(tokens.shape)}")
    return tokens.to(model.cfg.device)


def check_layers(
    model: TransformerBridge, layers: Sequence[int] | None, *, final: bool = True
) -> list[int]:
    """Validate residual-layer indices; ``n_layers`` (the final residual) allowed if ``final``."""
    n = model.cfg.n_layers
    top = n if final else n - 1
    if layers is None:
        return list(range(top + 1))
    out = [int(layer) for layer in layers]
    if not out:
        raise ValueError("layers is empty")
    bad = [layer for layer in out if not 0 <= layer <= top]
    if bad:
        raise ValueError(
            f"layer(s) {bad} out of range: this model has {n} layers, so residual layers run 0..{top}"
            + (f" ({n} = after the last block)" if final else "")
        )
    return out


@torch.no_grad()
def capture_residuals(
    model: TransformerBridge,
    inputs: Inputs,
    *,
    layers: Sequence[int] | None = None,
) -> Float[Tensor, "layer batch pos d_model"]:
    """The residual stream before every block and after the last one.

    Args:
        model: A bridge from :func:`residkit.load`.
        inputs: A prompt, list of prompts or token tensor.
        layers: Residual layers to keep, in ``0..n_layers`` (``n_layers`` = after the last
            block). Default: all ``n_layers + 1``.

    Returns:
        The residuals, stacked in the order of ``layers``. Values are the tensors the hooks
        saw, so they equal ``run_with_cache`` bitwise.

    Raises:
        ValueError: empty prompt, or a layer out of range.

    Example:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> residkit.capture_residuals(model, "2 + 2 =").shape
        torch.Size([5, 1, 8, 64])
    """
    spec = spec_for(model)
    wanted = check_layers(model, layers)
    tokens = to_tokens(model, inputs)
    n = model.cfg.n_layers
    store: dict[int, Tensor] = {}

    def saver(layer: int) -> Callable[..., None]:
        # Bound per layer: the bridge reports canonical names (hook_in), not the alias we asked.
        def save(act: Tensor, hook: object) -> None:
            store[layer] = act.detach().clone()

        return save

    hooks = [(spec.resid_hook(layer, n), saver(layer)) for layer in sorted(set(wanted))]
    with temporary_hooks(model, hooks):
        model(tokens, return_type=None)
    return torch.stack([store[layer] for layer in wanted])
