"""The adapter (residkit._bridge): the contract holds on every family, each assumption broken
on purpose is reported by name, and the hook bookkeeping catches a deliberate leak."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformers.cache_utils import DynamicCache, DynamicLayer

from residkit import _bridge
from residkit._bridge import contract
from residkit._bridge.contract import CONTRACT, BridgeContractError, check_contract
from residkit.generation import Chat, generate


def test_contract_holds_on_every_family(family: str, model_for) -> None:
    check_contract(model_for(family), force=True)


def test_every_assumption_has_a_name_and_a_sentence() -> None:
    names = [a.name for a in CONTRACT]
    assert len(names) == len(set(names)) >= 8
    assert all(a.what and a.what[0].islower() for a in CONTRACT)


def broken(model, name: str) -> BridgeContractError:
    with pytest.raises(BridgeContractError) as err:
        check_contract(model, force=True)
    assert err.value.assumption == name
    assert repr(name) in str(err.value) and "transformer-lens" in str(err.value)
    return err.value


def test_attention_that_ignores_its_cache_is_caught(model_for, monkeypatch) -> None:
    """A TransformerLens that never hands the cache to update() (as 4.3 did on 5.24 before
    residkit's shim): cached decoding would attend to the newest token alone."""
    model = model_for("llama")
    monkeypatch.setattr(AttentionBridge, "_update_kv_cache", lambda self, k, v, **kw: (k, v))
    message = str(broken(model, "forward-writes-given-cache"))
    assert "attend to the newest token alone" in message


def test_a_cache_that_bypasses_its_layers_is_caught(model_for, monkeypatch) -> None:
    """A transformers whose Cache stores K/V without calling the layers' update()."""
    model = model_for("qwen3")

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = DynamicLayer()
        layer.lazy_initialization(key_states, value_states)
        return layer.update(key_states, value_states)

    monkeypatch.setattr(DynamicCache, "update", update)
    with pytest.raises(BridgeContractError) as err:
        check_contract(model, force=True)
    assert err.value.assumption in {"forward-writes-given-cache", "cache-layer-protocol"}


def test_a_class_level_forward_dispatch_is_caught(model_for, monkeypatch) -> None:
    """A TransformerLens whose components ignore per-instance forward overrides."""
    model = model_for("gpt2")
    call = GeneralizedComponent.__call__

    def class_forward(self, *args, **kwargs):
        if "forward" in self.__dict__:
            return type(self).forward(self, *args, **kwargs)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(GeneralizedComponent, "__call__", class_forward)
    broken(model, "instance-forward-override")


def test_a_wrong_norm_path_is_caught(model_for, monkeypatch) -> None:
    import dataclasses

    from residkit import architectures

    model = model_for("llama")
    row = dataclasses.replace(architectures.ARCH_TABLE["llama"], attn_norm_path="no_such_norm")
    monkeypatch.setitem(architectures._BY_MODEL_TYPE, "llama", row)
    broken(model, "qkv-norm-components")


def test_public_functions_refuse_a_broken_pair(model_for, no_leaked_hooks, monkeypatch) -> None:
    model = model_for("mistral")
    monkeypatch.setattr(contract, "_CHECKED", contract.weakref.WeakKeyDictionary())
    monkeypatch.setattr(AttentionBridge, "_update_kv_cache", lambda self, k, v, **kw: (k, v))
    with no_leaked_hooks(model):
        with pytest.raises(BridgeContractError, match="forward-writes-given-cache"):
            generate(model, "abc", max_new_tokens=2)
        with pytest.raises(BridgeContractError, match="forward-writes-given-cache"):
            Chat(model, "full")


def test_the_contract_runs_once_per_model(model_for, monkeypatch) -> None:
    model = model_for("olmo2")
    calls: list[str] = []
    probe = contract.Assumption("probe", "a probe", lambda m, s: calls.append("x"))
    monkeypatch.setattr(contract, "CONTRACT", (probe,))
    monkeypatch.setattr(contract, "_CHECKED", contract.weakref.WeakKeyDictionary())
    check_contract(model)
    check_contract(model)
    assert calls == ["x"]


@contextmanager
def leak_detector(model, no_leaked_hooks) -> Iterator[None]:
    with (
        pytest.raises(AssertionError, match=r"1 hook\(s\) left on the model"),
        no_leaked_hooks(model),
    ):
        yield


@pytest.mark.parametrize("kind", ["hook point", "forward override", "cache shim"])
def test_hook_count_catches_a_deliberate_leak(kind: str, model_for, no_leaked_hooks) -> None:
    """Negative control of the leak oracle every test uses: each kind of leak is counted."""
    model = model_for("llama")
    handles = []
    with leak_detector(model, no_leaked_hooks):
        if kind == "hook point":
            handles.append(model.blocks[1].hook_resid_pre.add_hook(lambda act, hook: None))
        elif kind == "forward override":
            object.__setattr__(model.blocks[2], "forward", lambda x, *a, **k: x)
        else:
            handles.append(
                model.blocks[0].attn.register_forward_pre_hook(
                    _bridge.cache._rename_cache_kwarg, with_kwargs=True
                )
            )
    for handle in handles:
        getattr(handle, "hook", handle).remove()  # a TransformerLens LensHandle wraps torch's
    model.blocks[1].hook_resid_pre.fwd_hooks.clear()
    if "forward" in model.blocks[2].__dict__:
        object.__delattr__(model.blocks[2], "forward")


def test_cached_forward_leaves_no_shim(model_for, no_leaked_hooks) -> None:
    model = model_for("gemma3")
    cache = _bridge.new_cache(model)
    with no_leaked_hooks(model), torch.no_grad():
        _bridge.cached_forward(model, model.to_tokens("abc"), cache)
    assert cache.get_seq_length() == 4  # BOS + 3 bytes


def test_positionwise_parts_off_the_path_are_caught(model_for, monkeypatch) -> None:
    """A bridge whose decoder layers call the HF MLP and projections directly, so replacing
    the components changes nothing: a sweep would silently compute every position."""
    import contextlib

    model = model_for("llama")
    monkeypatch.setattr(contract, "positionwise_at", lambda *a, **k: contextlib.nullcontext())
    message = str(broken(model, "positionwise-parts"))
    assert "changed nothing" in message


def test_positionwise_at_refuses_a_part_that_is_not_positionwise(model_for) -> None:
    from residkit._bridge import positionwise_at

    model = model_for("llama")
    with (
        pytest.raises(ValueError, match=r"parts \['k'\] are not positionwise"),
        positionwise_at(model, {0: torch.arange(2)}, {"k"}),
    ):
        pass
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__]
