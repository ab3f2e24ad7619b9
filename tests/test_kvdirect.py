"""KV-Direct: bit-exact decoding from residual checkpoints with bounded active K/V."""

import pytest
import torch

import residkit
from residkit import KVDirect
from residkit.generation import generate, generate_kvdirect
from residkit.policies.checkpoints import ResidualCheckpoints
from tests.conftest import Boom, failing_forward, full_reference, get_hf, get_model, raises_naming

TEXT = "The residual stream is all you need, says the paper; we check it here, live, now."
N_NEW = 48


def _prompt(model) -> torch.Tensor:
    """Exactly 64 tokens on every family (some tokenizers prepend BOS, some do not)."""
    return model.to_tokens(TEXT)[:, :64]


PROMPT = TEXT[:63]


def _full(family: str):
    return full_reference(family, _prompt(get_model(family)), N_NEW)


@pytest.mark.parametrize("budget", [1, 4, 16, 100])
def test_exact_layer_mode_is_bitwise(family: str, budget: int, model_for, no_leaked_hooks) -> None:
    model = model_for(family)
    prompt = _prompt(model)
    assert prompt.shape[1] == 64
    full = _full(family)
    with no_leaked_hooks(model):
        kvd = generate_kvdirect(
            model,
            prompt,
            max_new_tokens=N_NEW,
            budget=budget,
            return_logits=True,
            stop_at_eos=False,
        )
    assert torch.equal(kvd.tokens, full.tokens)
    assert torch.equal(kvd.logits, full.logits)  # every step's logits, bit for bit
    evicted = max(0, 64 + N_NEW - 1 - budget)
    assert kvd.stats.tokens_evicted == evicted


def test_tokens_equal_hf_generate(family: str, model_for) -> None:
    """Full cache == HF generate here; KV-Direct == full cache at every budget (test above)."""
    model = model_for(family)
    tokens = _prompt(model)
    with torch.no_grad():
        ref = get_hf(family).generate(
            tokens, do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW
        )
    kvd = generate_kvdirect(model, tokens, max_new_tokens=N_NEW, budget=4, stop_at_eos=False)
    full = _full(family)
    # min_new_tokens masks EOS in HF; compare while the reference did not need that mask.
    eos = model.tokenizer.eos_token_id
    stop = next((i for i, t in enumerate(full.tokens.tolist()) if t == eos), N_NEW)
    assert stop > 0
    assert torch.equal(full.tokens[:stop], ref[0, 64:][:stop])
    assert torch.equal(kvd.tokens[:stop], ref[0, 64:][:stop])


def test_user_hooks_fire_as_under_full_cache(model_for, no_leaked_hooks) -> None:
    """Recompute runs the model's own layers; a user's hook must not see those runs."""
    model = model_for("llama")
    counts = {}
    for name, policy in [("full", "full"), ("layer", KVDirect(2)), ("token", KVDirect(2, "token"))]:
        fired: list[int] = []
        hook = ("blocks.1.attn.hook_k", lambda act, hook, fired=fired: fired.append(act.shape[1]))
        with no_leaked_hooks(model), model.hooks(fwd_hooks=[hook]):
            generate(model, PROMPT, max_new_tokens=6, policy=policy, stop_at_eos=False)
        counts[name] = fired
    assert counts["layer"] == counts["full"] == counts["token"]


@pytest.mark.parametrize(
    ("family_", "checkpoint", "mode"),
    [
        # token/exact replays every evicted chunk through the whole stack each step: the
        # slowest mode, so it runs on two families (one with sliding layers) and 16 tokens.
        ("llama", "token", "exact"),
        ("gemma3", "token", "exact"),
        *[
            (f, c, "fast")
            for f in ("llama", "gemma3", "gpt_neox", "phi3")
            for c in ("layer", "token")
        ],
    ],
)
def test_other_modes(family_: str, checkpoint: str, mode: str, model_for) -> None:
    model = model_for(family_)
    n_new = 16 if mode == "exact" else N_NEW
    full = generate(model, PROMPT, max_new_tokens=n_new, return_logits=True, stop_at_eos=False)
    policy = KVDirect(4, checkpoint, mode, measure_deviation=mode == "fast")
    gen = generate(
        model, PROMPT, max_new_tokens=n_new, policy=policy, return_logits=True, stop_at_eos=False
    )
    assert torch.equal(gen.tokens, full.tokens)
    if mode == "exact":
        assert torch.equal(gen.logits, full.logits)
        assert gen.stats.max_logit_deviation is None
    else:
        # Batched recompute: float32 rounding of the attention inputs only.
        assert 0.0 <= gen.stats.max_logit_deviation < 1e-3


def test_sampling_with_seed_matches_full_cache(model_for) -> None:
    model = model_for("qwen3")
    kw = {"max_new_tokens": 24, "do_sample": True, "seed": 11, "top_p": 0.95, "stop_at_eos": False}
    full = generate(model, PROMPT, **kw)
    kvd = generate_kvdirect(model, PROMPT, budget=4, **kw)
    other = generate_kvdirect(model, PROMPT, budget=4, **{**kw, "seed": 12})
    assert torch.equal(kvd.tokens, full.tokens)
    assert not torch.equal(kvd.tokens, other.tokens)


def test_memory_bound_on_a_long_generation(model_for) -> None:
    """1,000+ tokens: active K/V never above budget x per-token K/V; checkpoints = formula."""
    model = model_for("llama")
    cfg = model.cfg
    budget = 16
    prompt = torch.randint(0, 256, (1, 700), generator=torch.Generator().manual_seed(0))
    n_new = 400  # 1,099 tokens in all; a long prompt keeps the step count (and time) down
    gen = generate(
        model,
        prompt,
        max_new_tokens=n_new,
        policy=KVDirect(budget, "layer", "fast"),
        stop_at_eos=False,
    )
    assert len(gen.tokens) == n_new
    per_token_kv = cfg.n_layers * 2 * cfg.n_key_value_heads * cfg.d_head * 4  # float32
    # Recorded after each forward (the prefill included): the window is trimmed by then.
    assert max(a for a, _ in gen.stats.per_step) <= budget * per_token_kv
    fed = 700 + n_new - 1
    assert gen.stats.checkpoint_bytes == fed * cfg.n_layers * cfg.d_model * 4
    # The buffers' spare rows are reported apart: at most 1/GROWTH of the rows (+1 per layer).
    spare = gen.stats.checkpoint_reserved_bytes - gen.stats.checkpoint_bytes
    assert 0 <= spare <= (fed // ResidualCheckpoints.GROWTH + 1) * cfg.n_layers * cfg.d_model * 4
    assert gen.stats.tokens_evicted == fed - budget
    # Token mode keeps 8 bytes per token instead.
    tok = generate(
        model, "x", max_new_tokens=40, policy=KVDirect(budget, "token", "fast"), stop_at_eos=False
    )
    assert tok.stats.checkpoint_bytes == (model.to_tokens("x").shape[1] + 39) * 8


def test_checkpoints_are_appended_in_place() -> None:
    """A step copies its own rows, not the stored ones: regrowth is amortised."""
    store = ResidualCheckpoints()
    chunks = [torch.randn(1, 512, 8)] + [torch.randn(1, 1, 8) for _ in range(600)]
    grown = [store.append(c) for c in chunks]
    assert torch.equal(store.rows(), torch.cat(chunks, dim=1))
    assert not torch.equal(store.rows()[:, 1:], torch.cat(chunks, dim=1)[:, :-1])  # control
    row = 8 * 4
    assert sum(g > 0 for g in grown) == 6  # 576 -> 649 -> 731 -> 823 -> 927 -> 1044 -> 1175 rows
    assert sum(grown) <= (store.GROWTH + 1) * 600 * row  # vs 600 x ~800 rows if merged per step
    assert store.nbytes == 1112 * row
    assert store.nbytes < store.reserved_bytes <= store.nbytes * (1 + 1 / store.GROWTH) + row


def test_checkpoints_bad_input() -> None:
    store = ResidualCheckpoints()
    with pytest.raises(ValueError, match="no checkpoints stored yet"):
        store.rows()
    store.append(torch.zeros(1, 3, 8))
    for bad in (torch.zeros(1, 1, 9), torch.zeros(2, 1, 8)):  # d_model, batch
        with pytest.raises(ValueError, match=rf"rows of shape \({bad.shape[0]}"):
            store.append(bad)
    assert store.rows().shape == (1, 3, 8)  # left as it was


def test_sliding_layers_keep_no_checkpoints(model_for) -> None:
    model = model_for("gemma3")  # layers 0 and 2 are sliding
    gen = generate_kvdirect(model, PROMPT, max_new_tokens=8, budget=4, stop_at_eos=False)
    fed = model.to_tokens(PROMPT).shape[1] + 7
    assert gen.stats.checkpoint_bytes == fed * 2 * model.cfg.d_model * 4  # 2 global layers


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: KVDirect(-1), "budget must be a non-negative int, got -1"),
    ],
)
def test_bad_policy(make, message) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens must be a non-negative int"),
        ({"budget": -3}, "budget must be a non-negative int"),
        ({"max_new_tokens": 3000}, "exceed the model's context"),
    ],
)
def test_bad_input(kwargs, message, model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    with no_leaked_hooks(model), pytest.raises(ValueError, match=message):
        generate_kvdirect(model, PROMPT, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name", "value"),
    [
        ({"checkpoint": "everywhere"}, "checkpoint", "everywhere"),
        ({"mode": "approx"}, "mode", "approx"),
    ],
)
def test_unknown_checkpoint_or_mode(
    kwargs, name: str, value: str, model_for, no_leaked_hooks
) -> None:
    model = model_for("llama")
    with raises_naming(name, value):
        KVDirect(4, **kwargs)
    with no_leaked_hooks(model), raises_naming(name, value):
        generate_kvdirect(model, PROMPT, **kwargs)


def test_hooks_removed_when_a_forward_raises(model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    with failing_forward(model), no_leaked_hooks(model), pytest.raises(Boom):
        generate_kvdirect(model, PROMPT, max_new_tokens=3, budget=1)
    assert residkit.generate_kvdirect is generate_kvdirect


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_recomputed_tokens_count_what_each_mode_must_compute(mode: str, model_for) -> None:
    """The benchmark's FLOP floor rests on this count: 10-token prompt, budget 4, 5 tokens.

    Before steps 1-4 the cache holds 10..13 tokens, so 6..9 are evicted. Fast mode recomputes
    exactly those (30 rows a layer); exact mode recomputes the whole 10-token prompt chunk that
    holds them (40 rows a layer). No decoded token is evicted yet.
    """
    model = model_for("llama")
    gen = generate_kvdirect(
        model,
        torch.arange(10).unsqueeze(0),
        max_new_tokens=5,
        budget=4,
        mode=mode,
        stop_at_eos=False,
    )
    per_layer = {"fast": 6 + 7 + 8 + 9, "exact": 4 * 10}[mode]
    assert gen.stats.recomputed_tokens == per_layer * model.cfg.n_layers


def test_chunked_prefill_bounds_every_forward(monkeypatch) -> None:
    """1,000 prompt tokens at budget 8, fed 8 at a time: during every forward each layer's
    stored K/V hold at most 8 + 8 tokens, and the recomputed K/V at most one layer's worth
    of the tokens seen so far; asserted from the cache objects, and both reported."""
    from residkit.policies.kvdirect import KVDirectLayer

    model = get_model("llama")
    cfg = model.cfg
    per_token_layer = 2 * cfg.n_key_value_heads * cfg.d_head * 4  # K and V, float32
    stored: list[int] = []
    recomputed: list[tuple[int, int]] = []
    real_append = KVDirectLayer.append

    def watched(self, keys, values):
        seen_before = self.cumulative_length
        old = self.cache.recomputed.get(self.layer)
        if old is not None:
            recomputed.append((old[0].shape[-2], seen_before))
        out = real_append(self, keys, values)
        stored.append(self.keys.shape[-2])
        return out

    monkeypatch.setattr(KVDirectLayer, "append", watched)
    prompt = torch.randint(0, 256, (1, 1000), generator=torch.Generator().manual_seed(2))
    gen = generate(
        model,
        prompt,
        max_new_tokens=3,
        policy=KVDirect(8, mode="fast", prefill_chunk=8),
        stop_at_eos=False,
    )
    assert len(stored) == (125 + 2) * cfg.n_layers
    assert max(stored) == 8 + 8
    assert recomputed and all(n <= seen for n, seen in recomputed)
    assert gen.stats.peak_active_kv_bytes == 16 * per_token_layer * cfg.n_layers
    one_layer_all_tokens = per_token_layer * 1002
    assert gen.stats.peak_transient_bytes > 0
    assert max(n for n, _ in recomputed) * per_token_layer <= one_layer_all_tokens


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_chunked_prefill_is_bitwise_equal_to_the_full_cache_chunked_alike(family: str) -> None:
    model = get_model(family)
    prompt = _prompt(model)  # 64 tokens, fed 8 at a time
    kw = {"max_new_tokens": 12, "return_logits": True, "stop_at_eos": False}
    full = generate(model, prompt, policy=residkit.FullCache(prefill_chunk=8), **kw)
    kvd = generate(model, prompt, policy=KVDirect(4, prefill_chunk=8), **kw)
    assert torch.equal(kvd.logits, full.logits)
    # How it relates to a one-chunk prefill: the same tokens here, logits in the last bits.
    whole = _full(family)
    assert torch.equal(kvd.tokens, whole.tokens[:12])
    assert (kvd.logits - whole.logits[:12]).abs().max() < 1e-3
