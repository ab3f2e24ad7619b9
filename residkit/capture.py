"""Capturing the residual stream at every layer.

The residual before block ``l`` is ``blocks.{l}.hook_resid_pre``; after the last block it is
the input of the final norm (``ln_final.hook_in``). :func:`capture_residuals` stacks them into
one ``[layer, batch, pos, d_model]`` tensor with ``n_layers + 1`` layers.
"""

import numbers
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import generation_config, temporary_hooks
from residkit._entry import entry
from residkit.architectures import spec_for

__all__ = [
    "Inputs",
    "capture_residuals",
    "capture_with_logits",
    "check_layer",
    "check_layers",
    "eos_ids",
    "left_pad",
    "pad_id",
    "to_tokens",
]

Inputs = str | Sequence[str] | Tensor
"""A prompt, a list of prompts, or token ids ``[batch, pos]`` / ``[pos]``."""


def to_tokens(
    model: TransformerBridge, prompt: Inputs, *, extra: int = 0
) -> Int[Tensor, "batch pos"]:
    """Token ids for ``prompt`` on the model's device, always 2-D, checked.

    Strings are tokenised as the model's tokenizer does with its defaults (see
    :func:`residkit.load`), never truncated. A list of strings of different token lengths is
    padded on the tokenizer's padding side.

    Args:
        model: A bridge from :func:`residkit.load`.
        prompt: A prompt, a list of prompts, or integer token ids ``[batch, pos]`` / ``[pos]``.
        extra: Tokens the caller will add after these (decoding); counted against the context.

    Raises:
        TypeError: ``prompt`` is none of those (None, a number, a list of non-strings), or a
            float tensor.
        ValueError: an empty prompt or list, a tensor of more than 2 dims, ids outside the
            vocabulary, or more tokens than the model's context holds.
    """
    if isinstance(prompt, Tensor):
        if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got dtype {prompt.dtype}")
        tokens = prompt.unsqueeze(0) if prompt.ndim == 1 else prompt
        if tokens.ndim != 2:
            raise ValueError(
                f"token tensor must be [batch, pos] or [pos], got shape {tuple(prompt.shape)}"
            )
        if tokens.numel():
            low, high = int(tokens.min()), int(tokens.max())
            vocab = int(model.cfg.d_vocab)
            if low < 0 or high >= vocab:
                bad = low if low < 0 else high
                raise ValueError(f"token id {bad} is outside the vocabulary 0..{vocab - 1}")
        tokens = tokens.long()  # int16, uint8, ...: the embedding takes int64 (or int32)
    else:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, Sequence) and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise TypeError(
                "prompt must be a string, a list of strings or an integer token tensor, "
                f"got {prompt!r:.80} ({type(prompt).__name__})"
            )
        if not prompts:
            raise ValueError("prompt is an empty list of prompts")
        if any(p == "" for p in prompts):
            raise ValueError("empty prompt: residkit needs at least one character of text")
        tokens = model.to_tokens(prompts if len(prompts) > 1 else prompts[0], truncate=False)
    if tokens.shape[-1] == 0 or tokens.shape[0] == 0:
        raise ValueError(f"empty token tensor of shape {tuple(tokens.shape)}")
    n_ctx = int(model.cfg.n_ctx)
    if tokens.shape[1] + extra > n_ctx:
        more = f" + {extra} to generate" if extra else ""
        raise ValueError(
            f"{tokens.shape[1]} tokens{more} exceed the model's context of {n_ctx} tokens"
        )
    return tokens.to(model.cfg.device)


def eos_ids(model: TransformerBridge) -> set[int]:
    """Token ids that end generation: the tokenizer's EOS and the generation config's, as HF's
    ``generate`` stops on the latter (Gemma lists several)."""
    ids: set[int] = set()
    tok_eos = getattr(model.tokenizer, "eos_token_id", None)
    for e in (tok_eos, getattr(generation_config(model), "eos_token_id", None)):
        ids.update([e] if isinstance(e, int) else list(e or []))
    return ids


def pad_id(model: TransformerBridge) -> int:
    """The id a padded position and a finished row hold: the generation config's
    ``pad_token_id``, else the tokenizer's, else its first EOS (as transformers' generate)."""
    config = generation_config(model)
    for candidate in (
        getattr(config, "pad_token_id", None),
        getattr(model.tokenizer, "pad_token_id", None),
    ):
        if isinstance(candidate, int):
            return candidate
    eos = sorted(eos_ids(model))
    return eos[0] if eos else 0


def left_pad(
    model: TransformerBridge, prompts: list[str], *, extra: int = 0
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Each prompt tokenised alone, then left padded with :func:`pad_id`: ids and the 2-D
    attention mask (1 at real tokens), as transformers' ``generate`` feeds a batch."""
    rows = [to_tokens(model, p, extra=extra)[0] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id(model), dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    device = rows[0].device
    return ids.to(device), mask.to(device)


def check_layers(
    model: TransformerBridge, layers: Sequence[int] | None, *, final: bool = True
) -> list[int]:
    """Validate residual-layer indices; ``n_layers`` (the final residual) allowed if ``final``.

    Raises:
        TypeError: a layer that is not an int (a bool or a float included).
        ValueError: an empty list, or a layer out of range.
    """
    n = model.cfg.n_layers
    top = n if final else n - 1
    if layers is None:
        return list(range(top + 1))
    if isinstance(layers, str) or not isinstance(layers, Sequence | range):
        raise TypeError(f"layers must be a list of ints, got {layers!r:.80}")
    out = [check_layer(model, layer, final=final) for layer in layers]
    if not out:
        raise ValueError("layers is empty")
    return out


def check_layer(model: TransformerBridge, layer: object, *, final: bool = True) -> int:
    """One residual-layer index, checked (see :func:`check_layers`)."""
    n = model.cfg.n_layers
    top = n if final else n - 1
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(f"layer indices must be ints, got {layer!r} ({type(layer).__name__})")
    value = int(layer)
    if not 0 <= value <= top:
        raise ValueError(
            f"layer(s) [{value}] out of range: this model has {n} layers, so residual layers "
            f"run 0..{top}" + (f" ({n} = after the last block)" if final else "")
        )
    return value


def _keep(store: dict[Any, Any], key: Any, act: Tensor, hook: object) -> None:
    store[key] = act.detach().clone()


@entry
@torch.no_grad()
def capture_residuals(
    model: TransformerBridge,
    prompt: Inputs,
    *,
    layers: Sequence[int] | None = None,
) -> Float[Tensor, "layer batch pos d_model"]:
    """The residual stream before every block and after the last one.

    Args:
        model: A bridge from :func:`residkit.load`.
        prompt: A prompt, list of prompts or token tensor. A list of strings is tokenised
            prompt by prompt and left padded (with the attention mask and positions, so each
            row's real tokens are those of its prompt alone, up to the last bits); its padded
            positions hold the padding's residuals.
        layers: Residual layers to keep, in ``0..n_layers`` (``n_layers`` = after the last
            block). Default: all ``n_layers + 1``.

    Returns:
        The residuals, stacked in the order of ``layers``. Values are the tensors the hooks
        saw, so they equal ``run_with_cache`` bitwise.

    Raises:
        TypeError: not a model, prompt of the wrong type, a layer that is not an int.
        ValueError: empty prompt, ids outside the vocabulary, more tokens than the context,
            or a layer out of range.

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> residkit.capture_residuals(model, "2 + 2 =").shape
        torch.Size([5, 1, 8, 64])
    """
    spec = spec_for(model)
    wanted = check_layers(model, layers)
    kwargs: dict[str, Any] = {}
    if isinstance(prompt, Sequence) and not isinstance(prompt, str) and len(prompt) > 1:
        # Each prompt tokenised alone and left padded, with the mask and positions a batch
        # needs: without them the short prompts' rows would attend to their padding.
        tokens, mask = left_pad(model, list(prompt))
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        kwargs = {"attention_mask": mask, "position_ids": positions}
    else:
        tokens = to_tokens(model, prompt)
    n = model.cfg.n_layers
    store: dict[int, Tensor] = {}
    # Keyed by layer: the bridge reports canonical names (hook_in), not the alias we asked.
    hooks = [
        (spec.resid_hook(layer, n), partial(_keep, store, layer)) for layer in sorted(set(wanted))
    ]
    with temporary_hooks(model, hooks):
        model(tokens, return_type=None, **kwargs)
    return torch.stack([store[layer] for layer in wanted])


def capture_with_logits(
    model: TransformerBridge, tokens: Tensor, layers: list[int]
) -> tuple[Tensor, Tensor]:
    """The residuals at ``layers`` (stacked) and the logits, from one forward."""
    spec, n = spec_for(model), model.cfg.n_layers
    store: dict[int, Tensor] = {}

    def keep(layer: int, act: Tensor, hook: object) -> None:
        store[layer] = act.detach().clone()

    hooks = [(spec.resid_hook(layer, n), partial(keep, layer)) for layer in sorted(set(layers))]
    with temporary_hooks(model, hooks):
        logits = model(tokens)
    return torch.stack([store[layer] for layer in layers]), logits
