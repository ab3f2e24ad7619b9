"""Residual patching and activation-patching sweeps."""

import pytest
import torch
from transformer_lens import patching as tl_patching

import residkit
from residkit.patching import patch_residual, patching_heatmap, patching_sweep
from tests.conftest import Boom, failing_forward


def test_final_layer_patch(model_for) -> None:
    model = model_for("gemma3")
    n = model.cfg.n_layers
    resid = residkit.capture_residuals(model, "hello there", layers=[n])[0]
    assert torch.equal(patch_residual(model, "HELLO THERE", resid, layer=n), model("hello there"))


def test_sweep_matches_transformer_lens(model_for) -> None:
    model = model_for("llama")
    clean, corrupted = model.to_tokens("The cat sat on"), model.to_tokens("The dog ran on")

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, 100] - logits[0, -1, 101]

    ours = patching_sweep(model, clean, corrupted, metric, progress=False)
    _, clean_cache = model.run_with_cache(clean)
    ref = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert ours.shape == ref.shape == (model.cfg.n_layers, clean.shape[1])
    assert (ours - ref).abs().max().item() <= 1e-6
    assert ours.abs().max().item() > 0  # the sweep measured something
    assert patching_heatmap(ours).data[0].z.shape == tuple(ours.shape)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda m: patch_residual(m, "abc", torch.zeros(1, 4, 63), layer=1),
            r"residual has shape \(1, 4, 63\)",
        ),
        (lambda m: patch_residual(m, "abc", torch.zeros(1, 4, 64), layer=5), "out of range"),
        (
            lambda m: patch_residual(m, "abc", torch.zeros(1, 4, 64), layer=1, positions=[7]),
            r"positions \[7\] invalid",
        ),
        (lambda m: patching_sweep(m, "abc", "abcd", lambda x: x.sum()), "same token length"),
    ],
)
def test_bad_input(call, message, model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    with no_leaked_hooks(model), pytest.raises(ValueError, match=message):
        call(model)


def test_hooks_and_skips_removed_on_error(model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    resid = torch.zeros(1, 3, 64)
    with failing_forward(model), no_leaked_hooks(model), pytest.raises(Boom):
        patch_residual(model, "ab", resid, layer=2)
    assert all("forward" not in b.__dict__ for b in model.blocks)
