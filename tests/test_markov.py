"""The Markov property at every layer of every family, its controls and its cost."""

import pytest

import residkit
from residkit.markov import TASKS, cross_task_suite, markov_test
from residkit.metrics import kl_divergence
from residkit.patching import patch_residual
from tests.conftest import raises_naming


def test_markov_holds_at_every_layer(family: str, model_for, no_leaked_hooks) -> None:
    model = model_for(family)
    with no_leaked_hooks(model):
        report = markov_test(model, TASKS["arithmetic"], TASKS["translation"], align="right")
    table = report.table
    assert report.passed, report.reason
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
    # source captured and scored in one run (L) + target (L) + patched runs
    # sum_{l=0..L} (L - l) = L(L+1)/2: (L + 1) / 2 + 2 forward-equivalents
    assert len(calls) == 2 * n + n * (n + 1) // 2
    naive = 3 * n + n * (n + 1)  # a capture run apart, and every patched run doing all L blocks
    assert len(calls) < naive


def test_cross_task_suite(model_for, no_leaked_hooks) -> None:
    model = model_for("gpt2")
    with no_leaked_hooks(model):
        suite = cross_task_suite(model, progress=False)
    table = suite.table
    assert len(TASKS) >= 5
    assert len(table) == len(TASKS) * (len(TASKS) - 1) * (model.cfg.n_layers + 1)
    assert suite.passed and (table["kl"] == 0.0).all() and (table["control_kl"] > 0).all()
    assert set(table["align"]) <= {"right", "none (equal lengths)"}
    assert len(suite.figure().data) == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: markov_test(m, "abc", "abcdef"), "source has 4 tokens but target has 7"),
        (lambda m: markov_test(m, "abc", "def", layers=[9]), r"layer\(s\) \[9\] out of range"),
        (lambda m: markov_test(m, "", "def"), "empty prompt"),
        (lambda m: markov_test(m, "abc", "abc"), "same tokens"),
    ],
)
def test_bad_input(call, message, model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    with no_leaked_hooks(model), pytest.raises(ValueError, match=message):
        call(model)


def test_unknown_alignment(model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    with no_leaked_hooks(model), raises_naming("align", "middle"):
        markov_test(model, "abc", "def", align="middle")
