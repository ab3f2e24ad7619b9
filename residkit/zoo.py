"""Offline model zoo: random-init checkpoints of real architecture families.

Nothing here downloads anything. :func:`build` writes a ``safetensors`` checkpoint plus a
byte-level tokenizer (made with ``tokenizers``) into a folder that :func:`residkit.load` boots
through the same ``TransformerBridge.boot_transformers`` path a hub model takes.

Random weights are enough for every claim residkit checks: exact K/V recomputation, the
Markov property of the residual stream and cache-policy token identity are properties of the
computation, not of what the weights learned. Tiny models use ``initializer_range=0.2`` so
attention is far from uniform; with HF's default 0.02 every head attends almost uniformly,
and a bug that permutes or drops keys can go unnoticed.

Examples:
    >>> from residkit import zoo
    >>> path = zoo.build("llama", size="tiny")
    >>> (path / "model.safetensors").exists()
    True
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from residkit._paths import home

__all__ = [
    "ARCHITECTURES",
    "PAPER_CONFIGS",
    "SIZES",
    "VARIANTS",
    "build",
    "cache_root",
    "config_for",
]


def _paper_configs() -> dict[str, dict[str, Any]]:
    from importlib.resources import files

    text = files("residkit").joinpath("data/paper_configs.json").read_text()
    return dict(json.loads(text)["models"])


PAPER_CONFIGS: dict[str, dict[str, Any]] = _paper_configs()
"""The paper's seven published model shapes (``residkit/data/paper_configs.json``): per key,
``family``, ``hf_id``, ``source``, ``dtype``, ``notes`` (which verbatim copies of config.json
each was read from), ``field_notes`` (where a value not in config.json comes from) and
``config`` (HF config kwargs as published)."""

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259  # 256 bytes + bos, eos, pad: ids 0..255 are the bytes themselves.
_ZOO_FORMAT = 2  # bump when the files build() writes change, so stale caches are rebuilt


@dataclass(frozen=True)
class _Size:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    initializer_range: float


SIZES: dict[str, _Size] = {
    # 4 layers so alternating local/global patterns have both kinds twice.
    "tiny": _Size(4, 64, 4, 2, 16, 128, 0.2),
    # ~5M parameters; std 0.05 keeps d_model=256 activations O(1) while attention stays peaked.
    "small": _Size(6, 256, 8, 4, 32, 768, 0.05),
}

SLIDING_WINDOW = 8  # short enough that a 64-token prompt crosses it several times


def _common(s: _Size) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": s.d_model,
        "intermediate_size": s.d_mlp,
        "num_hidden_layers": s.n_layers,
        "num_attention_heads": s.n_heads,
        "num_key_value_heads": s.n_kv_heads,
        "head_dim": s.d_head,
        "max_position_embeddings": 2048,
        "initializer_range": s.initializer_range,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }


def _alternating(s: _Size) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(s.n_layers)]


def _llama(s: _Size) -> dict[str, Any]:
    return {**_common(s), "tie_word_embeddings": True}  # SmolLM2-style GQA, tied embeddings


def _qwen2(s: _Size) -> dict[str, Any]:
    c = _common(s)
    c.pop("head_dim")  # Qwen2 derives head_dim = hidden / heads; q/k/v biases are built in
    return {**c, "tie_word_embeddings": True}


def _qwen3(s: _Size) -> dict[str, Any]:
    return {**_common(s), "tie_word_embeddings": True}  # QK-norm is built into the family


def _mistral(s: _Size) -> dict[str, Any]:
    # MistralConfig defaults to a 4096-token window; the plain variant has none at all.
    return {**_common(s), "tie_word_embeddings": False, "sliding_window": None}


def _gemma2(s: _Size) -> dict[str, Any]:
    return {
        **_common(s),
        "sliding_window": SLIDING_WINDOW,
        "layer_types": _alternating(s),
        "query_pre_attn_scalar": s.d_head,
    }


def _gemma3(s: _Size) -> dict[str, Any]:
    return {
        **_common(s),
        "sliding_window": SLIDING_WINDOW,
        "layer_types": _alternating(s),
        "query_pre_attn_scalar": s.d_head,
        # Local layers rotate with base 1e4, global ones with 1e6: a wrong choice is visible.
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
    }


def _gpt2(s: _Size) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB_SIZE,
        "n_positions": 2048,
        "n_embd": s.d_model,
        "n_layer": s.n_layers,
        "n_head": s.n_heads,
        "n_inner": s.d_mlp,
        "initializer_range": s.initializer_range,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }


def _gpt_neox(s: _Size) -> dict[str, Any]:
    c = _common(s)
    for key in ("num_key_value_heads", "head_dim"):
        c.pop(key)
    return {
        **c,
        "use_parallel_residual": True,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10_000.0,
            "partial_rotary_factor": 0.25,
        },
    }


def _phi3(s: _Size) -> dict[str, Any]:
    c = _common(s)
    c.pop("head_dim")
    return {**c, "original_max_position_embeddings": 2048}


def _olmo2(s: _Size) -> dict[str, Any]:
    c = _common(s)
    c.pop("head_dim")
    return c


# family -> (HF model_type, config builder). Keys are the names users pass to build().
_FAMILIES = {
    "llama": ("llama", _llama),
    "qwen2": ("qwen2", _qwen2),
    "qwen3": ("qwen3", _qwen3),
    "mistral": ("mistral", _mistral),
    "gemma2": ("gemma2", _gemma2),
    "gemma3": ("gemma3_text", _gemma3),
    "gpt2": ("gpt2", _gpt2),
    "gpt_neox": ("gpt_neox", _gpt_neox),
    "phi3": ("phi3", _phi3),
    "olmo2": ("olmo2", _olmo2),
}

ARCHITECTURES: tuple[str, ...] = tuple(_FAMILIES)
"""The ten architecture families the zoo builds and residkit supports."""

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # Mistral with sliding-window attention on every layer (the original Mistral-7B setting).
    "mistral-swa": ("mistral", {"sliding_window": SLIDING_WINDOW}),
}
"""Named variants: ``name -> (family, config overrides)``."""


def cache_root() -> Path:
    """Folder where built checkpoints live: ``residkit._paths.home()`` (``$RESIDKIT_HOME``)."""
    return home()


def config_for(
    arch: str,
    *,
    size: str = "tiny",
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """The ``transformers`` config :func:`build` would use, without building anything.

    Args:
        arch: A family in :data:`ARCHITECTURES` or a name in :data:`VARIANTS`.
        size: ``"tiny"`` or ``"small"``; ignored when ``config`` is given.
        config: A key of :data:`PAPER_CONFIGS` (full-size published shape).
        overrides: Extra config fields, applied last.

    Raises:
        ValueError: unknown architecture, size or paper config, or a paper config of
            another family.
    """
    from transformers import AutoConfig

    family, extra = _resolve(arch)
    model_type, builder = _FAMILIES[family]
    if config is not None:
        if config not in PAPER_CONFIGS:
            raise ValueError(
                f"unknown paper config {config!r}; known: {', '.join(sorted(PAPER_CONFIGS))}"
            )
        paper = PAPER_CONFIGS[config]
        if paper["family"] != family:
            raise ValueError(
                f"paper config {config!r} is a {paper['family']} model, not {family}; "
                f"use zoo.build({paper['family']!r}, config={config!r})"
            )
        kwargs = {
            k: v for k, v in paper["config"].items() if k not in ("model_type", "architectures")
        }
    else:
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
        kwargs = builder(SIZES[size])
    kwargs.update(extra)
    kwargs.update(overrides or {})
    return AutoConfig.for_model(model_type, **kwargs)


def _resolve(arch: str) -> tuple[str, dict[str, Any]]:
    if arch in _FAMILIES:
        return arch, {}
    if arch in VARIANTS:
        return VARIANTS[arch]
    known = ", ".join([*ARCHITECTURES, *VARIANTS])
    raise ValueError(f"unknown architecture {arch!r}; the zoo builds: {known}")


def build(
    arch: str,
    *,
    size: str = "tiny",
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random-init checkpoint of ``arch`` and return its folder.

    The folder holds ``config.json``, ``model.safetensors`` and a byte-level tokenizer, and
    boots offline with :func:`residkit.load`. A folder already built with the same recipe is
    reused, so calling this twice is cheap.

    Args:
        arch: A family in :data:`ARCHITECTURES` or a variant in :data:`VARIANTS`.
        size: ``"tiny"`` (about 0.1M parameters, builds in well under a second) or
            ``"small"`` (about 5M parameters).
        seed: Seed for ``torch.manual_seed`` before the random initialisation.
        root: Parent folder; defaults to ``cache_root() / "zoo"``.
        config: A key of :data:`PAPER_CONFIGS` to build a full-size published shape instead.
        overrides: Extra ``transformers`` config fields.
        dtype: dtype of the saved weights.

    Returns:
        The checkpoint folder.

    Examples:
        >>> from residkit import zoo
        >>> zoo.build("gemma3", size="tiny").name
        'gemma3-tiny-s0'
    """
    from transformers import AutoModelForCausalLM

    hf_config = config_for(arch, size=size, config=config, overrides=overrides)
    recipe = {
        "format": _ZOO_FORMAT,
        "arch": arch,
        "size": None if config else size,
        "paper_config": config,
        "seed": seed,
        "dtype": str(dtype),
        "config": hf_config.to_diff_dict(),
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()
    name = f"{arch}-{config or size}-s{seed}"
    if overrides:
        name += f"-{digest[:8]}"
    folder = Path(root) if root is not None else cache_root() / "zoo"
    out = folder / name
    manifest = out / "residkit_zoo.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("digest") == digest:
        return out

    out.mkdir(parents=True, exist_ok=True)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    finally:
        torch.random.set_rng_state(generator_state)  # building must not disturb the caller's RNG
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(out, safe_serialization=True)
    byte_tokenizer().save_pretrained(out)
    manifest.write_text(json.dumps({"digest": digest, **recipe}, indent=1, default=str))
    return out


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable stand-ins for bytes, so byte b gets token id b.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def byte_tokenizer() -> Any:
    """A byte-level ``PreTrainedTokenizerFast``: token id ``b`` is byte ``b``; 256-258 special.

    Like Llama's tokenizers it prepends its BOS itself, so HF's default tokenisation and
    residkit's agree.

    Examples:
        >>> tok = byte_tokenizer()
        >>> tok("hi")["input_ids"]
        [256, 104, 105]
        >>> tok.decode([104, 105])
        'hi'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|bos|>", "<|eos|>", "<|pad|>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=2048,
    )
