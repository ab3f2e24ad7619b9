"""One declarative table of the architecture facts residkit relies on.

Every place in residkit that needs to know something about a family (which hook holds the
keys attention consumes, where the rotary module lives, which layers are sliding-window)
reads it from :data:`ARCH_TABLE`, in the spirit of pyvene's model cards. Adding a family is
adding a row; nothing else branches on the architecture name.

Hook names are TransformerLens 4 ``TransformerBridge`` names, with ``{layer}`` filled in.
The facts about the hooks were measured on TL 4.3 / transformers 5.23 (see
``tests/test_architectures.py``): ``hook_rot_k`` equals the keys in the model's own cache
bitwise where it fires; GPT-NeoX and Phi-3 compute rotary inside a fused-QKV bridge that
fires no post-rotary key hook, so their row says ``key_hook=None``.

Examples:
    >>> from residkit.architectures import ARCH_TABLE
    >>> ARCH_TABLE["gemma3"].layer_types_field
    'layer_types'
    >>> ARCH_TABLE["gpt2"].position
    'absolute'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge.model import hf_config, is_bridge

__all__ = [
    "ARCH_TABLE",
    "SCOPES",
    "ArchSpec",
    "Scope",
    "UnsupportedArchitectureError",
    "spec_for",
    "supported",
]


Scope = Literal["global", "all"]
SCOPES: tuple[Scope, ...] = ("global", "all")
"""Which layers a cache policy manages: the global (full-attention) ones, or all of them."""


class UnsupportedArchitectureError(ValueError):
    """The model's family has no row in :data:`ARCH_TABLE`.

    Examples:
        >>> from transformers import BertConfig
        >>> spec_for(BertConfig())
        Traceback (most recent call last):
        ...
        residkit.architectures.UnsupportedArchitectureError: residkit has no architecture facts for model_type 'bert'; ...
    """


@dataclass(frozen=True)
class ArchSpec:
    """Facts about one architecture family.

    Attributes:
        family: residkit's name for the family (the zoo's name).
        model_types: HF ``config.model_type`` values that map to this row.
        layers_path: Attribute path of the decoder-layer list on the HF ``*ForCausalLM``.
        rotary_path: Attribute path of the rotary-embedding module, or None (no rotary).
        rotary_by_layer_type: The rotary module takes the layer type (Gemma 3: local layers
            rotate with a different base than global ones).
        position: ``"rotary"``, ``"partial_rotary"`` or ``"absolute"`` (added to the residual
            before block 0, so it is part of the stream).
        k_norm: ``None``, ``"per_head"`` (RMSNorm over d_head) or ``"full"`` (over all heads).
        attn_norm_path: Path, inside a decoder layer, of the norm whose output feeds Q/K/V, or
            None when the layer feeds the raw residual (OLMo 2 normalises after attention).
        norm_offset: Added to the norm gain (Gemma's RMSNorm multiplies by ``1 + w``).
        window_rule: How sliding-window layers are declared in the HF config:
            ``"layer_types"`` (per-layer list), ``"all_layers"`` (one ``sliding_window``
            applying to every layer) or ``"none"``.
        key_hook: Hook whose value is the key exactly as attention consumes it (after any
            k-norm and rotary), or None when the bridge fires no such hook.
        query_placeholder: What K/V recomputation feeds the attention bridge instead of Q, which
            K and V never read: ``"empty"`` (zero heads, so neither Q's GEMM nor its rotary
            runs) or ``"zeros"`` (Q's full shape: the joint-QKV bridges infer ``d_head`` from Q's
            width, and OLMo 2 normalises Q over its full width).
        patch_hooks: Activation-patching point -> hook template, for
            :func:`residkit.patching_sweep`. Families whose attention and MLP read the same
            residual in parallel (GPT-NeoX) have no ``resid_mid``.
        notes: One line on what makes the family interesting here.

    Examples:
        >>> ARCH_TABLE["gemma3"].k_norm, ARCH_TABLE["gpt2"].position, ARCH_TABLE["gemma3"].norm_offset
        ('per_head', 'absolute', 1.0)
    """

    family: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    rotary_path: str | None = "model.rotary_emb"
    rotary_by_layer_type: bool = False
    position: Literal["rotary", "partial_rotary", "absolute"] = "rotary"
    k_norm: Literal["per_head", "full"] | None = None
    attn_norm_path: str | None = "input_layernorm"
    norm_offset: float = 0.0
    window_rule: Literal["layer_types", "all_layers", "none"] = "none"
    key_hook: str | None = "blocks.{layer}.attn.hook_rot_k"
    pre_rotary_key_hook: str = "blocks.{layer}.attn.hook_k"
    value_hook: str = "blocks.{layer}.attn.hook_v"
    pattern_hook: str = "blocks.{layer}.attn.hook_pattern"
    resid_pre_hook: str = "blocks.{layer}.hook_resid_pre"
    final_resid_hook: str = "ln_final.hook_in"
    query_placeholder: Literal["empty", "zeros"] = "empty"
    gated_mlp: bool = True  # gate, up and down projections (3 GEMMs) rather than in and out (2)
    patch_hooks: tuple[tuple[str, str], ...] = (
        ("resid_pre", "blocks.{layer}.hook_resid_pre"),
        ("resid_mid", "blocks.{layer}.hook_resid_mid"),
        ("attn_out", "blocks.{layer}.hook_attn_out"),
        ("mlp_out", "blocks.{layer}.hook_mlp_out"),
        ("z", "blocks.{layer}.attn.hook_z"),
    )
    notes: str = ""

    @property
    def layer_types_field(self) -> str | None:
        """The HF config field listing per-layer attention types, if the family uses one."""
        return "layer_types" if self.window_rule == "layer_types" else None

    def resid_hook(self, layer: int, n_layers: int) -> str:
        """Hook of the residual entering block ``layer``; ``layer == n_layers`` is the final."""
        if layer == n_layers:
            return self.final_resid_hook
        return self.resid_pre_hook.format(layer=layer)

    def patch_hook(self, point: str, layer: int) -> str:
        """Hook name of activation-patching ``point`` at block ``layer``.

        Raises:
            ValueError: the family has no such point (the message lists the ones it has).

        Examples:
            >>> ARCH_TABLE["llama"].patch_hook("attn_out", 3)
            'blocks.3.hook_attn_out'
        """
        table = dict(self.patch_hooks)
        if point not in table:
            raise ValueError(
                f"hook {point!r} is not a patching point of {self.family}; "
                f"it has: {', '.join(table)}"
            )
        return table[point].format(layer=layer)

    def sliding_layers(self, hf_config: Any) -> tuple[int, ...]:
        """Indices of layers whose attention is limited to a sliding window."""
        n = hf_config.num_hidden_layers
        if self.window_rule == "layer_types":
            types = getattr(hf_config, "layer_types", None) or ["full_attention"] * n
            return tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        if self.window_rule == "all_layers" and getattr(hf_config, "sliding_window", None):
            return tuple(range(n))
        return ()

    def global_layers(self, hf_config: Any) -> list[int]:
        """Indices of layers attending to the whole context (the ones a KV policy manages)."""
        sliding = set(self.sliding_layers(hf_config))
        return [i for i in range(hf_config.num_hidden_layers) if i not in sliding]

    def managed_layers(self, hf_config: Any, scope: Scope) -> list[int]:
        """Layers a cache policy of ``scope`` manages: the global ones, or every layer."""
        if scope == "all":
            return list(range(hf_config.num_hidden_layers))
        return self.global_layers(hf_config)

    def window_limit(self, hf_config: Any, scope: Scope) -> int | None:
        """Most tokens a policy of ``scope`` may hold the model to, or None for no limit.

        A policy managing a sliding-window layer attends to every token it keeps; the model
        attends to the last ``sliding_window`` only. The two agree while the sequence fits the
        window, so ``scope="all"`` is limited to that.
        """
        if scope != "all" or not self.sliding_layers(hf_config):
            return None
        return int(hf_config.sliding_window)

    def layer_type(self, hf_config: Any, layer: int) -> str:
        """``"sliding_attention"`` or ``"full_attention"`` for ``layer``."""
        return "sliding_attention" if layer in self.sliding_layers(hf_config) else "full_attention"


_ROWS = [
    ArchSpec("llama", ("llama",), notes="SmolLM2 / Llama 3: GQA, RMSNorm, tied embeddings"),
    ArchSpec(
        "qwen2",
        ("qwen2",),
        window_rule="layer_types",
        notes="q/k/v biases; sliding window only if use_sliding_window",
    ),
    ArchSpec("qwen3", ("qwen3",), k_norm="per_head", window_rule="layer_types", notes="QK-norm"),
    ArchSpec("mistral", ("mistral",), window_rule="all_layers", notes="optional sliding window"),
    ArchSpec(
        "gemma2",
        ("gemma2",),
        norm_offset=1.0,
        window_rule="layer_types",
        notes="local/global alternation, logit soft-capping, sandwich norms",
    ),
    ArchSpec(
        "gemma3",
        ("gemma3_text",),
        rotary_by_layer_type=True,
        k_norm="per_head",
        norm_offset=1.0,
        window_rule="layer_types",
        notes="QK-norm, local layers rotate with their own base (1e4 vs 1e6)",
    ),
    ArchSpec(
        "gpt2",
        ("gpt2",),
        gated_mlp=False,
        layers_path="transformer.h",
        rotary_path=None,
        position="absolute",
        attn_norm_path="ln_1",
        key_hook="blocks.{layer}.attn.hook_k",  # no rotary: hook_k is what attention consumes
        query_placeholder="zeros",
        notes="fused c_attn, learned absolute positions, LayerNorm",
    ),
    ArchSpec(
        "gpt_neox",
        ("gpt_neox",),
        gated_mlp=False,
        layers_path="gpt_neox.layers",
        rotary_path="gpt_neox.rotary_emb",
        position="partial_rotary",
        key_hook=None,
        query_placeholder="zeros",
        patch_hooks=(
            ("resid_pre", "blocks.{layer}.hook_resid_pre"),
            ("attn_out", "blocks.{layer}.hook_attn_out"),
            ("mlp_out", "blocks.{layer}.hook_mlp_out"),
            ("z", "blocks.{layer}.attn.hook_z"),
        ),
        notes="parallel attention + MLP, rotary on 25% of each head",
    ),
    ArchSpec(
        "phi3",
        ("phi3",),
        window_rule="all_layers",
        key_hook=None,
        query_placeholder="zeros",
        notes="fused qkv_proj and gate_up_proj",
    ),
    ArchSpec(
        "olmo2",
        ("olmo2",),
        k_norm="full",
        attn_norm_path=None,
        query_placeholder="zeros",  # q_norm runs over Q's full width
        notes="no pre-norm: RMSNorm after attention and MLP, QK-norm over all heads",
    ),
]

ARCH_TABLE: dict[str, ArchSpec] = {row.family: row for row in _ROWS}
"""Family name -> :class:`ArchSpec`: the one table of architecture facts.

Examples:
    >>> sorted(ARCH_TABLE)[:4], ARCH_TABLE["llama"].key_hook
    (['gemma2', 'gemma3', 'gpt2', 'gpt_neox'], 'blocks.{layer}.attn.hook_rot_k')
"""

_BY_MODEL_TYPE = {mt: row for row in _ROWS for mt in row.model_types}


def supported() -> tuple[str, ...]:
    """Names of the supported families."""
    return tuple(ARCH_TABLE)


def spec_for(model: TransformerBridge | Any) -> ArchSpec:
    """The :class:`ArchSpec` row of a bridge (or of an HF config / model).

    Raises:
        UnsupportedArchitectureError: the family has no row; the message lists the rows.

    Examples:
        >>> import residkit
        >>> spec_for(residkit.load("zoo:qwen3")).family, spec_for(residkit.load("zoo:qwen3")).k_norm
        ('qwen3', 'per_head')
    """
    config = getattr(model, "config", None)
    if is_bridge(model):
        config = hf_config(model)
    elif config is None:
        config = model  # an HF config object
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise UnsupportedArchitectureError(
            f"residkit has no architecture facts for model_type {model_type!r}; "
            f"supported families: {', '.join(supported())} "
            f"(HF model_types: {', '.join(sorted(_BY_MODEL_TYPE))})"
        )
    return _BY_MODEL_TYPE[model_type]
