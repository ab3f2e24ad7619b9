"""Every cache policy as a transformers cache (residkit/policies/base.py, residkit/_bridge/policy_cache.py):
the same decoding in any loop, and a clear error wherever a forward bypasses the cache's hooks."""

import pytest
import torch
from transformers import DynamicCache

import residkit
from residkit import zoo
from residkit._bridge import CacheHooksError, hook_count
from residkit.generation.engine import next_logits
from residkit.policies import (
    H2O,
    TOVA,
    FullCache,
    KVDirect,
    NoCache,
    SnapKV,
    StreamingLLM,
    Window,
    policy_classes,
)
from tests.conftest import get_model, greedy

PROMPT = "The residual stream carries everything"
N_NEW = 10

# One of each family: full, none, KV-Direct (layer, token, stride), the five baselines.
FAMILIES = {
    "full": FullCache(),
    "none": NoCache(),
    "kvdirect-layer": KVDirect(4),
    "kvdirect-token": KVDirect(4, checkpoint="token"),
    "kvdirect-stride": KVDirect(4, checkpoint="stride", stride=2),
    "window": Window(4),
    "streaming": StreamingLLM(4, n_sink=1),
    "h2o": H2O(4),
    "snapkv": SnapKV(4, window_size=2, kernel_size=1),
    "tova": TOVA(4),
}


def _reference(model, policy):
    return residkit.generate(
        model, PROMPT, max_new_tokens=N_NEW, policy=policy, return_logits=True, stop_at_eos=False
    )


@pytest.mark.parametrize("name", list(FAMILIES))
def test_transformers_generate_equals_residkit_generate(name: str, no_leaked_hooks) -> None:
    """The policy's cache in transformers' generate on the wrapped model: same tokens, and
    bitwise the same logits at every step (zoo gemma3: sliding and global layers)."""
    model, policy = get_model("gemma3"), FAMILIES[name]
    ref = _reference(model, policy)
    ids = model.to_tokens(PROMPT)
    with no_leaked_hooks(model), torch.no_grad(), policy.make_cache(model) as cache:
        out = model.original_model.generate(
            ids,
            past_key_values=cache,
            max_new_tokens=N_NEW,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert torch.equal(out.sequences[0, ids.shape[1] :], ref.tokens)
    assert ref.logits is not None
    for step, logits in enumerate(out.logits):
        assert torch.equal(logits[0], ref.logits[step]), f"step {step}"
    assert cache.memory.per_step == ref.stats.per_step


@pytest.mark.parametrize("name", ["kvdirect-stride", "h2o", "none"])
def test_a_users_loop_and_transformerlens_generate_decode_the_same(name: str) -> None:
    model, policy = get_model("llama"), FAMILIES[name]
    ref = _reference(model, policy)
    ids = model.to_tokens(PROMPT)
    with policy.make_cache(model) as cache:
        logits = greedy(model, cache, ids, N_NEW)
    assert ref.logits is not None
    assert all(torch.equal(a[0], b) for a, b in zip(logits, ref.logits, strict=True))
    with torch.no_grad(), policy.make_cache(model) as cache:
        seq = model.generate(
            ids, max_new_tokens=N_NEW, do_sample=False, past_key_values=cache, verbose=False
        )
    assert torch.equal(seq[0, ids.shape[1] :], ref.tokens)
    assert cache.memory.per_step == ref.stats.per_step


def test_generate_takes_every_policy_name() -> None:
    model = get_model("llama")
    names = sorted(policy_classes())
    assert names == ["full", "h2o", "kvdirect", "none", "snapkv", "streaming", "tova", "window"]
    full = residkit.generate(model, PROMPT, max_new_tokens=3, stop_at_eos=False)
    for name in names:
        gen = residkit.generate(model, PROMPT, max_new_tokens=3, policy=name, stop_at_eos=False)
        assert gen.policy.name == name and len(gen.tokens) == 3
        if name in ("full", "none", "kvdirect"):  # the default budget 64 holds this prompt
            assert torch.equal(gen.tokens, full.tokens)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_forward_without_the_hooks_raises(name: str, no_leaked_hooks) -> None:
    model, policy = get_model("llama"), FAMILIES[name]
    ids = model.to_tokens(PROMPT)
    with no_leaked_hooks(model), torch.no_grad():
        cache = policy.make_cache(model)  # never attached
        with pytest.raises(CacheHooksError, match="not attached to a model"):
            model(ids, past_key_values=cache)
        with (
            policy.make_cache(model) as cache,
            pytest.raises(CacheHooksError, match="another model"),
        ):
            get_model("qwen2")(ids, past_key_values=cache)
        with policy.make_cache(model) as cache:
            model.reset_hooks()
            with pytest.raises(CacheHooksError, match="were removed from the model"):
                model(ids, past_key_values=cache)


def test_a_cache_for_fewer_layers_names_the_count(no_leaked_hooks) -> None:
    small = get_model("llama")
    deeper = residkit.load(zoo.build("llama", overrides={"num_hidden_layers": 6}))
    with no_leaked_hooks(small), KVDirect(4).make_cache(small) as cache:
        # The deeper model's forward passes our hooks only if it is the same model: attach a
        # second cache's hooks to it so that the first layers pass the hook check.
        with pytest.raises(CacheHooksError, match="made for a model with 4 layers"):
            cache.model = deeper
            cache.detach()
            cache.attach()
            deeper(small.to_tokens(PROMPT), past_key_values=cache)
        cache.detach()
        cache.model = small


def test_foreign_forwards_on_the_model_leave_the_cache_alone() -> None:
    """While a cache is attached, forwards that do not use it (no cache, another cache) change
    nothing in it: decoding resumed afterwards is bitwise the uninterrupted one."""
    model, policy = get_model("llama"), KVDirect(3, checkpoint="stride", stride=2)
    ids = model.to_tokens(PROMPT)
    ref = _reference(model, policy)
    with torch.no_grad(), policy.make_cache(model) as cache:
        logits = [next_logits(model, ids, cache)]
        for step in range(N_NEW - 1):
            model(ids)  # no cache at all
            model(ids, past_key_values=DynamicCache(config=model.original_model.config))
            logits.append(next_logits(model, logits[-1].argmax(-1, keepdim=True), cache))
            assert len(cache.memory.per_step) == step + 2
    assert ref.logits is not None
    assert all(torch.equal(a[0], b) for a, b in zip(logits, ref.logits, strict=True))


def test_a_hook_added_while_attached_is_seen_by_the_checkpoints() -> None:
    """A user hook editing hook_resid_pre, added after the cache was attached, runs before the
    cache's checkpoint hook: KV-Direct then equals the full cache under the same edit."""
    model = get_model("llama")
    ids = model.to_tokens(PROMPT)

    def scale(act, hook):
        return act * 1.5

    edit = [("blocks.2.hook_resid_pre", scale)]
    out = {}
    for policy in (FullCache(), KVDirect(2)):
        with torch.no_grad(), policy.make_cache(model) as cache, model.hooks(fwd_hooks=edit):
            out[policy.name] = greedy(model, cache, ids, 6)
    assert all(torch.equal(a, b) for a, b in zip(out["full"], out["kvdirect"], strict=True))
    # Negative control: the edit changes the logits.
    with torch.no_grad(), FullCache().make_cache(model) as cache:
        plain = greedy(model, cache, ids, 6)
    assert not torch.equal(plain[-1], out["full"][-1])


def test_attaching_is_scoped(no_leaked_hooks) -> None:
    model = get_model("llama")
    before = hook_count(model)
    with no_leaked_hooks(model):
        cache = KVDirect(4).make_cache(model)
        with cache:
            assert cache.attached and hook_count(model) > before
        assert not cache.attached and hook_count(model) == before
        with pytest.raises(RuntimeError), cache:
            raise RuntimeError("inside")
        assert hook_count(model) == before


def test_generate_kvdirect_takes_every_kvdirect_option() -> None:
    model = get_model("llama")
    gen = residkit.generate_kvdirect(
        model, PROMPT, budget=3, checkpoint="stride", stride=2, keep_top=1, scope="all",
        max_new_tokens=4, stop_at_eos=False,
    )  # fmt: skip
    assert gen.policy == KVDirect(3, checkpoint="stride", stride=2, keep_top=1, scope="all")
    with pytest.raises(TypeError, match="stides"):
        residkit.generate_kvdirect(model, PROMPT, stides=2)
