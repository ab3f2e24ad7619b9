"""Stride checkpoints and per-layer plans: a residual every k managed layers, the layers
between rebuilt by replaying the evicted span through their blocks, bit for bit."""

import pytest
import torch

import residkit
from residkit import KVDirect
from residkit._bridge import Piece, cached_forward, kv_bytes, layer_kv, new_cache, replay_kv
from residkit._bridge.model import hf_config
from residkit.architectures import spec_for
from residkit.policies.plans import plan_bytes, resolve
from tests.conftest import (
    Boom,
    failing_forward,
    full_reference,
    get_model,
    get_real,
    greedy,
    raises_naming,
)

TEXT = "The residual stream is all you need, says the paper; we check it here, live, now."
N_NEW = 48
PLANS = [
    {"checkpoint": "stride", "stride": 2},
    {"checkpoint": "stride", "stride": 3, "keep_top": 1},
]


def _prompt(model) -> torch.Tensor:
    return model.to_tokens(TEXT)[:, :32]


@pytest.mark.parametrize("budget", [1, 16])
@pytest.mark.parametrize("plan", PLANS, ids=["stride2", "stride3-top1"])
def test_exact_stride_is_bitwise(family: str, budget: int, plan: dict, no_leaked_hooks) -> None:
    model = get_model(family)
    prompt = _prompt(model)
    full = full_reference(family, prompt, N_NEW)
    with no_leaked_hooks(model):
        kvd = residkit.generate(
            model,
            prompt,
            max_new_tokens=N_NEW,
            policy=KVDirect(budget, **plan),
            return_logits=True,
            stop_at_eos=False,
        )
    assert torch.equal(kvd.tokens, full.tokens)
    assert torch.equal(kvd.logits, full.logits)
    assert kvd.stats.tokens_evicted == prompt.shape[1] + N_NEW - 1 - budget


@torch.no_grad()
def test_replay_rebuilds_the_model_kv_and_detects_a_wrong_anchor() -> None:
    model = get_model("llama")
    ids = model.to_tokens(TEXT)[:, :20]
    hook = spec_for(model).resid_pre_hook
    saved: dict[int, list[torch.Tensor]] = {1: [], 2: []}

    def save(act: torch.Tensor, hook: object, layer: int) -> None:
        saved[layer].append(act.clone())

    # The reference forward in two chunks, as a prompt and a decoded token come.
    cache = new_cache(model)
    hooks = [(hook.format(layer=i), lambda a, hook, i=i: save(a, hook, i)) for i in saved]
    with model.hooks(fwd_hooks=hooks):
        cached_forward(model, ids[:, :19], cache)
        cached_forward(model, ids[:, 19:], cache)
    pieces = [ids[:, :19], ids[:, 19:]]
    starts = [0, 19]

    def fed(ids_rows, saved_rows, shift=0):
        return [
            Piece(p, torch.arange(s, s + p.shape[1]).unsqueeze(0) + shift, None, r)
            for s, p, r in zip(starts, ids_rows, saved_rows, strict=True)
        ]

    rebuilt, _ = replay_kv(model, hook, 1, [1, 2, 3], fed(pieces, saved[1]))
    for layer, (k, v) in rebuilt.items():
        ref_k, ref_v = layer_kv(cache, layer)  # type: ignore[misc]
        assert torch.equal(k, ref_k) and torch.equal(v, ref_v)
    ref = layer_kv(cache, 2)[0]  # type: ignore[index]
    # Negative controls: the residual of the wrong layer; the chunks fed at shifted positions.
    wrong = replay_kv(model, hook, 1, [2], fed(pieces, saved[2]))[0][2][0]
    assert not torch.equal(wrong, ref)
    shifted = replay_kv(model, hook, 1, [2], fed(pieces, saved[1], shift=1))[0][2][0]
    assert not torch.equal(shifted, ref)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize(
    "plan",
    [{"checkpoint": "layer"}, *PLANS, {"checkpoint": "stride", "stride": 100}],
    ids=["layer", "stride2", "stride3-top1", "stride-all"],
)
def test_predicted_bytes_equal_the_tensors(family: str, plan: dict) -> None:
    model = get_model(family)
    prompt = _prompt(model)
    budget, n_new = 8, 12
    policy = KVDirect(budget, **plan)
    with policy.make_cache(model) as cache:
        greedy(model, cache, prompt, n_new)
        measured = kv_bytes(cache) + cache.checkpoint_bytes()
    config = hf_config(model)
    spec = spec_for(model)
    layers = spec.managed_layers(config, "global")
    resolved = resolve(layers, plan["checkpoint"], plan.get("stride") or 1, plan.get("keep_top", 0))
    context = prompt.shape[1] + n_new - 1  # the last chosen token is not fed
    sliding = spec.sliding_layers(config)
    assert plan_bytes(resolved, config, context, budget, sliding=sliding) == measured
    # Negative control: one token more is another number.
    assert plan_bytes(resolved, config, context + 1, budget, sliding=sliding) != measured


def test_stride_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="needs stride=k"):
        KVDirect(4, "stride")
    with raises_naming("stride", 0):
        KVDirect(4, "stride", stride=0)
    with pytest.raises(ValueError, match="keep_top=2 must be below stride=2"):
        KVDirect(4, "stride", stride=2, keep_top=2)
    with pytest.raises(ValueError, match="apply to checkpoint='stride' only"):
        KVDirect(4, "layer", stride=2)


def test_hooks_removed_when_a_forward_raises(no_leaked_hooks) -> None:
    model = get_model("llama")
    with failing_forward(model), no_leaked_hooks(model), pytest.raises(Boom):
        residkit.generate(model, TEXT, max_new_tokens=3, policy=KVDirect(1, "stride", stride=2))


def test_an_edit_between_anchors_is_refused_by_name(no_leaked_hooks) -> None:
    model = get_model("llama")

    def edit(act: torch.Tensor, hook: object) -> torch.Tensor:
        return act * 1.5

    policy = KVDirect(2, "stride", stride=4)  # layer 0 anchors layers 1-3
    with (
        no_leaked_hooks(model),
        model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", edit)]),
        pytest.raises(ValueError, match=r"blocks\.1\.hook_mlp_out"),
    ):
        residkit.generate(model, TEXT, max_new_tokens=4, policy=policy)
    # An edit above the top rebuilt layer's K/V input changes no recomputed K/V: allowed.
    with model.hooks(fwd_hooks=[("blocks.3.hook_mlp_out", edit)]):
        residkit.generate(model, TEXT, max_new_tokens=4, policy=KVDirect(2, "stride", stride=4))


@pytest.mark.real_model
def test_memory_limit_holds_on_a_1000_token_run_with_the_full_cache_tokens() -> None:
    # A real model: with 30 layers a plan can beat the full cache; with the zoo's 4 small
    # layers the transient of any recompute costs more than the K/V it saves. At 1,000 tokens
    # the chosen plan's peak is 0.45x the full cache's (35 s; 1,200 tokens: 0.42x, 48 s: the
    # time grows with the square of the context, since every prompt chunk replays the
    # evicted span).
    model = get_real("smollm2-135m-instruct")
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, model.cfg.d_vocab, (1, 992), generator=generator)
    n_new = 9  # 992 + 8 fed = 1,000 tokens of context
    full = residkit.generate(model, prompt, max_new_tokens=n_new, stop_at_eos=False)
    limit = int(0.6 * full.stats.peak_total_bytes)
    # Prompt chunks of 256: each chunk replays the evicted span, so small chunks cost time.
    policy = KVDirect(32, memory_limit=limit, context=1000, prefill_chunk=256)
    chosen = policy.resolved(model)
    # A plan that recomputes (stride, or token ids since they replay layer by layer), not the
    # full cache and not layer checkpoints (which hold more than the K/V they replace).
    assert isinstance(chosen, KVDirect) and chosen.checkpoint in ("stride", "token"), chosen
    run = residkit.generate(model, prompt, max_new_tokens=n_new, policy=policy, stop_at_eos=False)
    assert torch.equal(run.tokens, full.tokens)
    # Every forward's active K/V + reserved checkpoints + transient stayed under the limit.
    assert run.stats.peak_total_bytes <= limit
    assert all(active + ckpt <= limit for active, ckpt in run.stats.per_step)
    assert run.stats.tokens_evicted == 1000 - 32


def test_memory_limit_below_every_plan_names_the_smallest_that_fits() -> None:
    model = get_model("llama")
    with pytest.raises(
        ValueError, match=r"memory_limit=1000 bytes .* smallest any plan can meet is \d+"
    ):
        KVDirect(32, memory_limit=1000, context=2000).resolved(model)
    with pytest.raises(ValueError, match="memory_limit needs context"):
        KVDirect(32, memory_limit=10**6)
    # A limit every plan meets picks the full cache (nothing to recompute).
    assert KVDirect(4, memory_limit=10**9, context=20).resolved(model).name == "full"
    with pytest.raises(ValueError, match="planned for context=20"):
        residkit.generate(model, TEXT, max_new_tokens=40, policy=KVDirect(4, context=20))


def test_an_edit_at_a_group_top_is_refused_and_one_at_an_anchor_is_exact() -> None:
    """With stride 2 on zoo qwen3 (4 layers: groups {0: [0, 1], 2: [2, 3]}), an edit of the
    residual entering layer 1 (a group's top) would not reach the K/V the replay rebuilds there,
    so it is refused by name; one at layer 2 (an anchor) is stored in the checkpoint, so the
    decode stays bitwise the full cache's under the same edit."""
    model = get_model("qwen3")
    prompt = _prompt(model)
    kw = {"max_new_tokens": 6, "return_logits": True, "stop_at_eos": False}

    def nudge(act: torch.Tensor, hook: object) -> torch.Tensor:
        return act * 1.01

    policy = KVDirect(2, "stride", stride=2)
    top = model.blocks[1].hook_resid_pre
    top.add_hook(nudge)
    try:
        with pytest.raises(ValueError, match=r"hooks at blocks\.1\.hook_(in|resid_pre)"):
            residkit.generate(model, prompt, policy=policy, **kw)
    finally:
        top.remove_hooks()
    anchor = model.blocks[2].hook_resid_pre
    anchor.add_hook(nudge)
    try:
        full = residkit.generate(model, prompt, **kw)
        kvd = residkit.generate(model, prompt, policy=policy, **kw)
    finally:
        anchor.remove_hooks()
    assert torch.equal(kvd.logits, full.logits)
    plain = residkit.generate(model, prompt, **kw)
    assert not torch.equal(plain.logits, full.logits)  # control: the edit changed the output
