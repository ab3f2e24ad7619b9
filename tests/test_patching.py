"""Residual patching: the Markov property at every layer of every family, and its controls."""

import pytest
import torch
from transformer_lens import patching as tl_patching

import residkit
from residkit.architectures import ArchSpec
from residkit.patching import (
    TASKS,
    cross_task_suite,
    kl_divergence,
    markov_test,
    patch_residual,
    patching_heatmap,
    patching_sweep,
)


def test_markov_holds_at_every_layer(family: str, model_for, no_leaked_hooks) -> None:
    model = model_for(family)
    with no_leaked_hooks(model):
        report = markov_test(model, TASKS["arithmetic"], TASKS["translation"], align="right")
    table = report.table
    assert report.holds, report.reason
    assert len(table) == model.cfg.n_layers + 1
    assert (table["kl"] == 0.0).all()
    assert table["bitwise_equal"].all()
    assert (table["control_kl"] > 0).all()  # the patch changed something
    assert (table["max_abs_dlogit"] == 0.0).all()


def test_partial_position_patch_breaks_it(model_for) -> None:
    """Negative control: patching only some positions leaves the target's information in."""
    model = model_for("llama")
    src, tgt = "The quick brown fox", "A lazy sleeping dog"
    resid = residkit.capture_residuals(model, src, layers=[1])[0]
    src_logits = model(src)
    full = patch_residual(model, tgt, resid, layer=1)
    partial = patch_residual(model, tgt, resid, layer=1, positions=[0, 1, 2])
    assert kl_divergence(src_logits, full).max().item() == 0.0
    assert kl_divergence(src_logits, partial).max().item() > 1e-3


def test_wrong_layer_is_detected(model_for) -> None:
    """Negative control: the residual of layer 2 patched in at layer 1 gives KL > 0."""
    model = model_for("qwen3")
    src, tgt = "abcdefghij", "klmnopqrst"
    resid = residkit.capture_residuals(model, src, layers=[2])[0]
    wrong = patch_residual(model, tgt, resid, layer=1)
    assert kl_divergence(model(src), wrong).max().item() > 1e-3


def test_markov_cost_is_about_half_the_forwards(model_for) -> None:
    """Blocks below the patched layer are not run: sum over l of (L - l), plus 2 full runs."""
    model = model_for("llama")
    n = model.cfg.n_layers
    calls = []
    hooks = [(f"blocks.{i}.hook_in", lambda act, hook: calls.append(hook.name)) for i in range(n)]
    with model.hooks(fwd_hooks=hooks):
        markov_test(model, "abcdefgh", "ijklmnop")
    # capture (L) + source (L) + target (L) + patched runs sum_{l=0..L} (L - l) = L(L+1)/2
    assert len(calls) == 3 * n + n * (n + 1) // 2
    naive = 3 * n + n * (n + 1)  # every patched run doing all L blocks
    assert len(calls) < naive


def test_final_layer_patch(model_for) -> None:
    model = model_for("gemma3")
    n = model.cfg.n_layers
    resid = residkit.capture_residuals(model, "hello there", layers=[n])[0]
    assert torch.equal(patch_residual(model, "HELLO THERE", resid, layer=n), model("hello there"))


def test_bypass_inputs_make_the_report_say_no(model_for) -> None:
    report = markov_test(model_for("llama"), "abcd", "efgh")
    assert report.holds
    report.bypass_inputs = ("per-layer token embeddings",)
    assert not report.holds
    assert "per-layer token embeddings" in report.reason
    assert ArchSpec("x", ("x",)).bypass_inputs == ()


def test_cross_task_suite(model_for, no_leaked_hooks) -> None:
    model = model_for("gpt2")
    with no_leaked_hooks(model):
        suite = cross_task_suite(model, progress=False)
    table = suite.table
    assert len(TASKS) >= 5
    assert len(table) == len(TASKS) * (len(TASKS) - 1) * (model.cfg.n_layers + 1)
    assert suite.holds and (table["kl"] == 0.0).all() and (table["control_kl"] > 0).all()
    assert set(table["align"]) <= {"right", "none (equal lengths)"}
    assert len(suite.figure().data) == 2


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
        (lambda m: markov_test(m, "abc", "abcdef"), "source has 4 tokens but target has 7"),
        (lambda m: markov_test(m, "abc", "def", layers=[9]), r"layer\(s\) \[9\] out of range"),
        (lambda m: markov_test(m, "", "def"), "empty prompt"),
        (lambda m: markov_test(m, "abc", "def", align="middle"), "align must be"),
        (lambda m: markov_test(m, "abc", "abc"), "same tokens"),
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
    bad_tokens = torch.tensor([[1, 2, 10_000]])
    with no_leaked_hooks(model), pytest.raises(IndexError):
        patch_residual(model, bad_tokens, resid, layer=2)
    assert all("forward" not in b.__dict__ for b in model.blocks)
