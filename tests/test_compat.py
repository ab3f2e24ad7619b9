"""The installed transformers / TransformerLens pair passes the cache to attention."""

import weakref

import pytest
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

from residkit import _compat
from residkit._compat import CacheNotWrittenError, check_bridge_writes_cache
from residkit.generation import Chat, generate


def test_the_installed_pair_writes_the_cache(family: str, model_for) -> None:
    model = model_for(family)
    check_bridge_writes_cache(model)
    assert _compat._WRITES_CACHE[model] is True


def test_a_bridge_that_ignores_the_cache_is_refused(
    model_for, no_leaked_hooks, monkeypatch
) -> None:
    """What transformers 5.24 + TransformerLens 4.3 do: attention never sees the cache."""
    model = model_for("llama")
    monkeypatch.setattr(_compat, "_WRITES_CACHE", weakref.WeakKeyDictionary())
    monkeypatch.setattr(AttentionBridge, "_update_kv_cache", lambda self, k, v, **kw: (k, v))
    with no_leaked_hooks(model):
        with pytest.raises(CacheNotWrittenError, match=r"transformers<5\.24"):
            generate(model, "abc", max_new_tokens=2)
        with pytest.raises(CacheNotWrittenError, match="silently ignore every earlier token"):
            Chat(model, "full")
    assert model not in _compat._WRITES_CACHE
