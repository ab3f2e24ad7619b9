"""The architecture table: one row per family, and the hook facts it states hold."""

import pytest
import torch

import residkit
from residkit._bridge import cached_forward, hf_config, layer_kv, new_cache
from residkit.architectures import ARCH_TABLE, UnsupportedArchitectureError, spec_for


def test_every_zoo_family_has_a_row() -> None:
    assert set(ARCH_TABLE) == set(residkit.zoo.ARCHITECTURES)


def test_unsupported_architecture_lists_supported() -> None:
    from transformers import BertConfig

    with pytest.raises(UnsupportedArchitectureError, match="supported families: llama, qwen2"):
        spec_for(BertConfig())


def test_key_hook_is_what_attention_consumes(family: str, model_for) -> None:
    """Where the table names a key hook, it equals the model's own cache bitwise."""
    model = model_for(family)
    spec = spec_for(model)
    tokens = model.to_tokens("keys are projections of the residual stream")
    _, cache = model.run_with_cache(tokens)
    hf_cache = new_cache(model)
    cached_forward(model, tokens, hf_cache)
    for layer in range(model.cfg.n_layers):
        keys, values = layer_kv(hf_cache, layer)  # [batch, kv_heads, pos, d_head]
        kept = keys.shape[2]  # sliding-window layers keep only the window's tail
        if layer in spec.sliding_layers(hf_config(model)):
            assert kept < tokens.shape[1]
        hook_v = cache[spec.value_hook.format(layer=layer)].transpose(1, 2)[:, :, -kept:]
        assert torch.equal(hook_v, values)
        if spec.key_hook is not None:
            hook_k = cache[spec.key_hook.format(layer=layer)].transpose(1, 2)[:, :, -kept:]
            assert torch.equal(hook_k, keys)
            # Negative control: pre-rotary keys (or, without rotary, another layer's) differ.
            other = cache[spec.key_hook.format(layer=(layer + 1) % model.cfg.n_layers)]
            assert not torch.equal(other.transpose(1, 2)[:, :, -kept:], keys)
        else:
            # No post-rotary hook fires for this family: the table must not claim one.
            assert f"blocks.{layer}.attn.hook_rot_k" not in cache


def test_sliding_layers() -> None:
    zoo = residkit.zoo
    assert ARCH_TABLE["gemma3"].sliding_layers(zoo.config_for("gemma3")) == (0, 2)
    assert ARCH_TABLE["gemma2"].sliding_layers(zoo.config_for("gemma2")) == (0, 2)
    assert ARCH_TABLE["mistral"].sliding_layers(zoo.config_for("mistral-swa")) == (0, 1, 2, 3)
    assert ARCH_TABLE["mistral"].sliding_layers(zoo.config_for("mistral")) == ()
    assert ARCH_TABLE["llama"].sliding_layers(zoo.config_for("llama")) == ()
