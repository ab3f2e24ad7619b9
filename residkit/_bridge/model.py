"""The parts of a ``TransformerBridge`` residkit reaches into, one function each.

Everything here is a fact about TransformerLens 4's bridge or the HF model it wraps that is
not part of TransformerLens's documented interface: where the HF model and config live, which
component holds a projection's ``nn.Linear``, where the norm feeding attention is, that a
decoder layer returns a bare tensor, how the tokenizer is stored. Each is named in
:mod:`residkit._bridge.contract`, so an upgrade that changes one fails there, by name.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components import PositionEmbeddingsAttentionBridge

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
    "part_module",
    "positionwise_at",
    "positionwise_parts",
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


POSITIONWISE = ("mlp", "q", "o")
"""Parts of a block that act on each position alone: the MLP, the query projection and the
attention's output projection (what :func:`positionwise_at` can run at some positions only)."""


def positionwise_parts(model: TransformerBridge) -> frozenset[str]:
    """The parts of :data:`POSITIONWISE` this bridge calls once per block on the residual
    stream's layout ``[batch, pos, width]``, so that :func:`positionwise_at` may replace them.

    The query and output projections qualify where attention is the bridge's
    ``PositionEmbeddingsAttentionBridge`` on its default path; the fused-QKV bridges derive
    the query from one joint projection, and the split-input and per-head-result options
    call the projections per head.
    """
    blocks = list(model.blocks)
    parts = {"mlp"} if all(hasattr(block, "mlp") for block in blocks) else set()
    cfg = model.cfg
    split = any(getattr(cfg, f, False) for f in ("use_split_qkv_input", "use_attn_in"))
    if all(isinstance(b.attn, PositionEmbeddingsAttentionBridge) for b in blocks):
        parts |= set() if split else {"q"}
        parts |= set() if getattr(cfg, "use_attn_result", False) else {"o"}
    return frozenset(parts)


def part_module(model: TransformerBridge, layer: int, name: str) -> nn.Module:
    block = model.blocks[layer]
    return block.mlp if name == "mlp" else getattr(block.attn, name)


@contextmanager
def positionwise_at(
    model: TransformerBridge, keep: dict[int, Tensor], parts: Collection[str]
) -> Iterator[None]:
    """For the block, block ``layer``'s ``parts`` (of :func:`positionwise_parts`) run only at
    the flat positions ``keep[layer]``.

    Their input ``[batch, pos, width]`` is read row-major, as in :func:`head_at`; their
    output is zero at every other position. Each part acts on each position alone, so the
    kept positions get what they would have got; the caller must not read the others. The
    parts' own hook points see only the kept positions, ``[1, len(keep), width]``.
    """
    unknown = sorted(set(parts) - set(POSITIONWISE))
    if unknown:
        raise ValueError(f"parts {unknown} are not positionwise; choose from {POSITIONWISE}")
    with ExitStack() as stack:
        for layer, rows in keep.items():
            for name in parts:
                module = part_module(model, layer, name)
                forward = type(module).forward

                def selected(
                    x: Tensor, *args: object, module: Any = module, forward: Any = forward,
                    rows: Tensor = rows, **kwargs: object,
                ) -> Tensor:  # fmt: skip
                    flat = x.reshape(-1, x.shape[-1])
                    part = forward(module, flat[rows].unsqueeze(0), *args, **kwargs)[0]
                    out = part.new_zeros(flat.shape[0], part.shape[-1])
                    out[rows] = part
                    return out.reshape(*x.shape[:-1], part.shape[-1])

                stack.enter_context(replaced_forward([module], selected))
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
