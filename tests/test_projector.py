"""The K/V recompute engine: each of its economies leaves K and V bit-identical."""

from typing import Any

import pytest
import torch
from transformers import DynamicCache

from residkit._bridge import cached_forward, layer_kv, new_cache
from residkit.architectures import spec_for
from residkit.projector import KVProjector, run_sizes, spans

PROMPT, DECODED = 30, 10
CHUNKS = [PROMPT] + [1] * DECODED


def _decode_and_capture(model) -> tuple[dict[int, torch.Tensor], DynamicCache]:
    """Residuals entering every block, and the model's own cache, over a prompt + 10 steps."""
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (1, PROMPT + DECODED))
    store: dict[int, list[torch.Tensor]] = {}

    def saver(layer: int) -> Any:
        return lambda act, hook: store.setdefault(layer, []).append(act.clone())

    hooks = [
        (f"blocks.{layer}.hook_resid_pre", saver(layer)) for layer in range(model.cfg.n_layers)
    ]
    cache = new_cache(model)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        cached_forward(model, tokens[:, :PROMPT], cache)
        for i in range(PROMPT, PROMPT + DECODED):
            cached_forward(model, tokens[:, i : i + 1], cache)
    return {layer: torch.cat(r, dim=1) for layer, r in store.items()}, cache


def test_spans() -> None:
    assert spans([3, 1, 2]) == [(0, 3), (3, 1), (4, 2)]
    # Runs of single-token chunks merge (negative length: that many one-row GEMMs).
    assert run_sizes([3, 1, 1, 2, 1]) == [(0, 3), (3, -2), (5, 2), (7, -1)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # K/V projections without, with bias
def test_single_token_runs_are_one_batched_gemm_and_stay_bitwise(
    family: str, model_for, monkeypatch
) -> None:
    """The 10 decoded tokens' projections go out as one batched GEMM of M = 1 problems per
    projection, and K/V stay equal to the model's cache. Negative control: the same rows as one
    M = 10 GEMM (a shape no original forward had) differ."""
    import residkit.projector as recompute

    model = model_for(family)
    resid, cache = _decode_and_capture(model)
    pos = torch.arange(PROMPT + DECODED).unsqueeze(0)
    batched = []
    for name in ("bmm", "baddbmm"):
        real = getattr(torch, name)
        monkeypatch.setattr(
            torch, name, lambda *a, real=real, **k: batched.append(1) or real(*a, **k)
        )
    with torch.no_grad():
        k, v, _ = KVProjector(model)(1, resid[1], pos, chunks=CHUNKS)
    assert len(batched) == 2  # K and V
    assert torch.equal(k, layer_kv(cache, 1)[0]) and torch.equal(v, layer_kv(cache, 1)[1])
    monkeypatch.setattr(recompute, "run_sizes", lambda sizes: [(0, PROMPT), (PROMPT, DECODED)])
    with torch.no_grad():
        k_wrong, v_wrong, _ = KVProjector(model)(1, resid[1], pos, chunks=CHUNKS)
    assert not (
        torch.equal(k_wrong, layer_kv(cache, 1)[0]) and torch.equal(v_wrong, layer_kv(cache, 1)[1])
    )


def test_chunked_recompute_equals_the_models_cache(family: str, model_for) -> None:
    """One call per layer, GEMMs per original chunk, norm and rotary batched: bitwise."""
    model = model_for(family)
    resid, cache = _decode_and_capture(model)
    projector = KVProjector(model)
    pos = torch.arange(PROMPT + DECODED).unsqueeze(0)
    for layer in range(model.cfg.n_layers):
        with torch.no_grad():
            k, v, _ = projector(layer, resid[layer], pos, chunks=CHUNKS)
        keys, values = layer_kv(cache, layer)
        kept = keys.shape[2]  # sliding layers keep a window
        assert torch.equal(k[:, :, -kept:], keys), f"layer {layer} keys"
        assert torch.equal(v[:, :, -kept:], values), f"layer {layer} values"
        # Negative control: the next layer's weights on the same residual.
        if layer + 1 < model.cfg.n_layers:
            with torch.no_grad():
                k_wrong, _, _ = projector(layer + 1, resid[layer], pos, chunks=CHUNKS)
            assert not torch.equal(k_wrong[:, :, -kept:], keys)


def test_chunk_boundaries_matter_for_rotary_positions(model_for) -> None:
    """Negative control: positions shifted by one break the keys of a rotary family."""
    model = model_for("llama")
    resid, cache = _decode_and_capture(model)
    shifted = torch.arange(1, PROMPT + DECODED + 1).unsqueeze(0)
    with torch.no_grad():
        k, _, _ = KVProjector(model)(1, resid[1], shifted, chunks=CHUNKS)
    assert not torch.equal(k, layer_kv(cache, 1)[0])


def test_no_query_gemm_and_no_user_hooks(family: str, model_for, no_leaked_hooks) -> None:
    """Q's projection never runs; a user's hooks on the layer never fire; nothing is left."""
    model = model_for(family)
    resid, _ = _decode_and_capture(model)
    attn = model.blocks[1].attn
    calls = {"q": 0, "user": 0}

    def count_q(module: Any, args: Any, out: Any) -> None:
        calls["q"] += 1

    def user(act: torch.Tensor, hook: Any) -> None:
        calls["user"] += 1

    spec = spec_for(model)
    handle = attn.q.original_component.register_forward_hook(count_q)
    try:
        with (
            no_leaked_hooks(model),
            model.hooks(
                fwd_hooks=[
                    ("blocks.1.hook_resid_pre", user),
                    (spec.value_hook.format(layer=1), user),
                    (spec.pre_rotary_key_hook.format(layer=1), user),
                    *([(spec.key_hook.format(layer=1), user)] if spec.key_hook else []),
                ]
            ),
            torch.no_grad(),
        ):
            KVProjector(model)(1, resid[1], torch.arange(PROMPT + DECODED).unsqueeze(0))
    finally:
        handle.remove()
    assert calls == {"q": 0, "user": 0}


def test_pre_rotary_keys_equal_hook_k(family: str, model_for) -> None:
    model = model_for(family)
    spec = spec_for(model)
    tokens = torch.randint(0, 256, (1, 12))
    store: dict[str, torch.Tensor] = {}

    def save(name: str) -> Any:
        def hook(act: torch.Tensor, hook: Any) -> None:
            store[name] = act.clone()

        return hook

    with (
        torch.no_grad(),
        model.hooks(
            fwd_hooks=[
                ("blocks.2.hook_resid_pre", save("resid")),
                (spec.pre_rotary_key_hook.format(layer=2), save("k")),
            ]
        ),
    ):
        model(tokens)
    with torch.no_grad():
        _, _, pre = KVProjector(model)(
            2, store["resid"], torch.arange(12).unsqueeze(0), pre_rotary_keys=True
        )
    assert pre is not None
    assert torch.equal(pre, store["k"])


def test_an_error_mid_forward_leaves_nothing_behind(model_for, no_leaked_hooks) -> None:
    """A residual of the wrong width fails inside the block; overrides are still removed."""
    model = model_for("llama")
    with no_leaked_hooks(model), pytest.raises(RuntimeError):
        KVProjector(model)(1, torch.zeros(1, 2, 63), torch.arange(2).unsqueeze(0))
    attn = model.blocks[1].attn
    assert "forward" not in vars(attn.q) and "forward" not in vars(attn.k)


def test_chunks_must_cover_the_residual(model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    with (
        no_leaked_hooks(model),
        pytest.raises(ValueError, match=r"sum to 3 but the residual has 4"),
    ):
        KVProjector(model)(1, torch.zeros(1, 4, 64), torch.arange(4).unsqueeze(0), chunks=[2, 1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("setting", ["set_use_split_qkv_input", "set_use_attn_in"])
def test_split_qkv_settings_stay_bitwise(family: str, setting: str, monkeypatch) -> None:
    """Under split-QKV input, attention projects per head with an einsum on the weights, so the
    projector runs the whole block once per original chunk; without that, K/V differ."""
    import residkit
    import residkit.projector as recompute
    from residkit import zoo

    model = residkit.load(zoo.build(family, size="tiny"))  # own copy: the setting mutates it
    getattr(model, setting)(True)
    resid, cache = _decode_and_capture(model)
    pos = torch.arange(PROMPT + DECODED).unsqueeze(0)
    with torch.no_grad():
        k, v, _ = KVProjector(model)(1, resid[1], pos, chunks=CHUNKS)
    assert torch.equal(k, layer_kv(cache, 1)[0]) and torch.equal(v, layer_kv(cache, 1)[1])
    with pytest.raises(ValueError, match="pre_rotary_keys is unavailable"):
        KVProjector(model)(1, resid[1], pos, pre_rotary_keys=True)
    # Negative control: treat the setting as absent (attention alone, one call for all chunks).
    monkeypatch.setattr(recompute, "_BLOCK_FLAGS", ())
    with torch.no_grad():
        k_wrong, _, _ = KVProjector(model)(1, resid[1], pos, chunks=CHUNKS)
    assert not torch.equal(k_wrong, layer_kv(cache, 1)[0])


def test_no_residual_is_left_with_attention(family: str, model_for) -> None:
    """The norm's pre-hook hands attention the residual; the projector clears it, as the block
    does, so no recompute input outlives the call."""
    model = model_for(family)
    resid, _ = _decode_and_capture(model)
    pos = torch.arange(PROMPT + DECODED).unsqueeze(0)
    with torch.no_grad():
        KVProjector(model)(1, resid[1], pos)
    assert getattr(model.blocks[1].attn, "_captured_pre_ln_residual", None) is None
