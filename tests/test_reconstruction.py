"""K/V recomputed from residuals equal the model's own, bit for bit, on every family."""

import pytest
import torch

import residkit
from residkit.architectures import ArchSpec
from residkit.reconstruction import kv_reconstruction_report, recompute_kv
from tests.conftest import get_model, raises_naming

PROMPT = "Keys and values are deterministic projections of the residual stream."


def test_exact_mode_is_bitwise_against_hooks_and_cache(
    family: str, model_for, no_leaked_hooks
) -> None:
    model = model_for(family)
    with no_leaked_hooks(model):
        report = kv_reconstruction_report(model, PROMPT, decode_steps=4)
    table = report.table
    assert report.passed, table.to_string()
    assert len(table) == model.cfg.n_layers
    assert (
        (table[["k_cache_max_err", "v_cache_max_err", "k_hook_max_err", "v_hook_max_err"]] == 0.0)
        .all()
        .all()
    )
    assert report.chunks == [model.to_tokens(PROMPT).shape[1], 1, 1, 1, 1]


def test_sliding_layers_compare_the_window_the_model_keeps(model_for) -> None:
    model = model_for("gemma3")
    table = kv_reconstruction_report(model, PROMPT).table
    sliding = table[table["layer_type"] == "sliding_attention"]
    assert len(sliding) == 2
    assert (sliding["cached_positions"] < model.to_tokens(PROMPT).shape[1]).all()


def test_fast_mode_reports_the_gemm_shape_error(model_for) -> None:
    """One GEMM over prompt + decoded rows is not the original chunking; the report says by how much."""
    model = model_for("llama")
    report = kv_reconstruction_report(model, PROMPT, decode_steps=8, mode="fast")
    errors = report.table[["k_cache_max_err", "v_cache_max_err"]]
    # float32 rounding of O(1) activations: far below 1e-4, and not the exact path.
    assert errors.max().max() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_bfloat16_exact_mode(arch: str, model_for) -> None:
    """bf16: exact mode is bitwise too (fast is not on every family: see docs/gemm_shapes.md)."""
    report = kv_reconstruction_report(model_for(arch, torch.bfloat16), PROMPT, decode_steps=4)
    assert report.passed, report.table.to_string()


def test_shifted_positions_give_large_errors(model_for) -> None:
    """Negative control: rotary at positions shifted by one is detected."""
    model = model_for("llama")
    tokens = model.to_tokens(PROMPT)
    resid = residkit.capture_residuals(model, tokens, layers=[1])[0]
    _, cache = model.run_with_cache(tokens)
    ref = cache["blocks.1.attn.hook_rot_k"].transpose(1, 2)
    k_ok, _ = recompute_kv(model, 1, resid, range(tokens.shape[1]))
    k_shift, _ = recompute_kv(model, 1, resid, range(1, tokens.shape[1] + 1))
    assert torch.equal(k_ok, ref)
    assert (k_shift - ref).abs().max().item() > 0.1


def test_wrong_rope_type_on_gemma3_gives_large_errors(model_for, monkeypatch) -> None:
    """Negative control: a Gemma 3 global layer rotated with the local base is detected."""
    model = model_for("gemma3")
    tokens = model.to_tokens(PROMPT)
    resid = residkit.capture_residuals(model, tokens, layers=[1])[0]  # layer 1 is global
    _, cache = model.run_with_cache(tokens)
    ref = cache["blocks.1.attn.hook_rot_k"].transpose(1, 2)
    k_ok, _ = recompute_kv(model, 1, resid, range(tokens.shape[1]))
    assert torch.equal(k_ok, ref)
    monkeypatch.setattr(ArchSpec, "layer_type", lambda self, cfg, layer: "sliding_attention")
    k_wrong, _ = recompute_kv(model, 1, resid, range(tokens.shape[1]))
    assert (k_wrong - ref).abs().max().item() > 0.1


def test_user_hooks_do_not_fire_during_recompute(model_for, no_leaked_hooks) -> None:
    """A hook off the recompute path does not see the recompute; one on it is refused."""
    model = model_for("qwen3")
    resid = residkit.capture_residuals(model, "abc", layers=[0])[0]
    fired = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda a, hook: fired.append(1))]):
        recompute_kv(model, 0, resid, range(resid.shape[1]))
        assert fired == []
        model("abc")
        assert fired == [1]
    observe = ("blocks.0.attn.hook_k", lambda a, hook: fired.append(2))
    with (
        no_leaked_hooks(model),
        model.hooks(fwd_hooks=[observe]),
        pytest.raises(ValueError, match=r"blocks\.0\.attn\.(k\.hook_out|hook_k).*muted"),
    ):
        recompute_kv(model, 0, resid, range(resid.shape[1]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, r: recompute_kv(m, 4, r, range(3)), "layer 4 out of range"),
        (lambda m, r: recompute_kv(m, -1, r, range(3)), "layer -1 out of range"),
        (lambda m, r: recompute_kv(m, 0, r[..., :32], range(3)), "width 32 but d_model is 64"),
        (lambda m, r: recompute_kv(m, 0, r, range(4)), r"positions have shape \(1, 4\)"),
        (lambda m, r: recompute_kv(m, 0, r, [-1, 0, 1]), "non-negative"),
        (
            lambda m, r: kv_reconstruction_report(m, "abc", decode_steps=-1),
            "decode_steps must be a non-negative int",
        ),
    ],
)
def test_bad_input(call, message, model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    resid = residkit.capture_residuals(model, "ab", layers=[0])[0]  # 3 tokens with BOS
    with no_leaked_hooks(model), pytest.raises(ValueError, match=message):
        call(model, resid)


def test_unknown_mode(model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    with no_leaked_hooks(model), raises_naming("mode", "batched"):
        kv_reconstruction_report(model, "abc", mode="batched")


def test_model_kv_cache_is_the_model_cache_and_checks_its_input(no_leaked_hooks) -> None:
    from residkit.reconstruction import model_kv_cache

    model = get_model("llama")
    ids = model.to_tokens("Keys are projections of the residual stream.")
    with no_leaked_hooks(model):
        cache = model_kv_cache(model, ids)
    resid = residkit.capture_residuals(model, ids)[1]
    k, _ = residkit.recompute_kv(model, 1, resid, positions=range(ids.shape[1]))
    assert torch.equal(k, cache.layers[1].keys)
    # Negative control: another layer's keys differ.
    assert not torch.equal(k, cache.layers[2].keys)
    with pytest.raises(ValueError, match="vocab"):
        model_kv_cache(model, torch.tensor([[1, model.cfg.d_vocab + 5]]))
    with pytest.raises(ValueError, match="one sequence"):
        model_kv_cache(model, ids.repeat(2, 1))
