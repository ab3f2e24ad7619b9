"""The parts of a ``TransformerBridge`` residkit reaches into, one function each.

Everything here is a fact about TransformerLens 4's bridge or the HF model it wraps that is
not part of TransformerLens's documented interface: where the HF model and config live, which
component holds a projection's ``nn.Linear``, where the norm feeding attention is, that a
decoder layer returns a bare tensor, how the tokenizer is stored. Each is named in
:mod:`residkit._bridge.contract`, so an upgrade that changes one fails there, by name.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge.hooks import replaced_forward

__all__ = [
    "attn_norm",
    "clear_pre_norm_capture",
    "generation_config",
    "hf_config",
    "hf_model",
    "is_bridge",
    "linear",
    "materialized",
    "n_kv_heads",
    "native_norm",
    "norms_folded",
    "set_tokenizer",
    "skipped_blocks",
]


def is_bridge(model: object) -> bool:
    """Whether ``model`` is a TransformerLens ``TransformerBridge``."""
    return isinstance(model, TransformerBridge)


def hf_model(model: TransformerBridge) -> nn.Module:
    """The HF ``*ForCausalLM`` the bridge wraps."""
    return model.original_model


def hf_config(model: TransformerBridge) -> Any:
    """The HF config of the model a bridge wraps."""
    return model.original_model.config


def generation_config(model: TransformerBridge) -> Any:
    """The wrapped model's ``GenerationConfig`` (None if it has none)."""
    return getattr(model.original_model, "generation_config", None)


def n_kv_heads(model: TransformerBridge) -> int:
    """Key/value heads per layer (``n_heads`` without grouped-query attention)."""
    return int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)


def linear(component: Any) -> nn.Module:
    """The HF module a bridge component wraps (an ``nn.Linear`` for q/k/v projections)."""
    return component.original_component


def attn_norm(model: TransformerBridge, layer: int, path: str | None) -> Any:
    """The norm feeding block ``layer``'s Q/K/V (a bridge component), or None if ``path`` is.

    ``path`` is the architecture table's ``attn_norm_path``, relative to the HF decoder layer.
    """
    if path is None:
        return None
    return operator.attrgetter(path)(model.blocks[layer].original_component)


def native_norm(norm: Any) -> nn.Module | None:
    """The HF norm module behind a norm bridge, if the bridge's output is that module's output.

    Such a bridge first computes ``hook_scale`` and ``hook_normalized`` for observers and then
    returns ``original_component(x)``; a recompute with hooks muted can call the HF module
    directly. A bridge that computes its own output (GPT-2's LayerNorm here) gives None.
    """
    if norm is None:
        return None
    is_native = getattr(norm, "use_native_layernorm_autograd", False) or getattr(
        getattr(norm, "config", None), "layer_norm_folding", False
    )
    return norm.original_component if is_native else None


def norms_folded(model: TransformerBridge) -> bool:
    """Whether the bridge has folded the norm gains into the weights after them."""
    return bool(getattr(model.cfg, "layer_norm_folding", False))


def clear_pre_norm_capture(attn: Any) -> None:
    """Drop the pre-norm residual a block's norm pre-hook may have handed ``attn``."""
    if hasattr(attn, "_captured_pre_ln_residual"):
        attn._captured_pre_ln_residual = None


def set_tokenizer(model: TransformerBridge, tokenizer: Any, *, prepends_bos: bool) -> None:
    """Give the bridge ``tokenizer`` as it is, and make ``to_tokens`` follow its BOS rule.

    The bridge's own setter would wrap it in a copy built with ``add_bos_token=True``.
    """
    object.__setattr__(model, "_tokenizer", tokenizer)
    model.cfg.tokenizer_prepends_bos = prepends_bos
    model.cfg.default_prepend_bos = prepends_bos


def _identity_block(hidden_states: Tensor, *args: object, **kwargs: object) -> Tensor:
    return hidden_states  # an HF decoder layer returns the hidden-state tensor itself


@contextmanager
def head_at(model: TransformerBridge, keep: Tensor) -> Iterator[None]:
    """For the block, the unembedding runs only at the flat positions ``keep`` of its input.

    The input ``[batch, pos, d_model]`` is read row-major (row ``r``'s position ``t`` is
    ``r * pos + t``); the forward then returns logits ``[1, len(keep), d_vocab]`` in the order
    of ``keep``, through the model's own unembedding (and whatever the model does after it,
    such as Gemma's soft-capping).
    """
    unembed = model.unembed
    forward = type(unembed).forward

    def selected(x: Tensor, *args: object, **kwargs: object) -> Tensor:
        return forward(unembed, x.reshape(-1, x.shape[-1])[keep].unsqueeze(0), *args, **kwargs)

    with replaced_forward([unembed], selected):
        yield


@contextmanager
def skipped_blocks(model: TransformerBridge, below: int) -> Iterator[None]:
    """Blocks ``0..below-1`` pass their input through unchanged for the duration of the block.

    For a forward whose residual at block ``below`` is replaced whole: what the lower blocks
    compute is discarded, so they need not run.
    """
    with replaced_forward(list(model.blocks[:below]), _identity_block):
        yield


@contextmanager
def materialized(module: nn.Module) -> Iterator[None]:
    """``module``'s own weights readable for the block, also when accelerate offloaded them
    (a ``device_map`` with ``"cpu"`` / ``"disk"`` entries leaves meta placeholders, which only
    the module's own forward swaps for the real tensors)."""
    if getattr(module, "_hf_hook", None) is None:
        yield
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield
