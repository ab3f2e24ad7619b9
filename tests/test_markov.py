"""The Markov property at every layer of every family, its controls and its cost."""

import pytest
import torch

import residkit
from residkit.capture import capture_with_logits
from residkit.markov import TASKS, _patched_rows, cross_task_suite, markov_test
from residkit.metrics import kl_divergence
from residkit.patching import patch_residual, run_patched_to_final
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
    # Every layer below the top stands on its final residual; the top runs the head itself.
    assert report.head_reproduces
    n = model.cfg.n_layers
    assert (table["compared"] == ["final residual"] * n + ["logits"]).all()


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_comparing_logits_gives_the_same_rows(family: str, model_for) -> None:
    """The direct route (every run's logits) agrees with the residual route row for row."""
    model = model_for(family)
    src, tgt = TASKS["code"], TASKS["factual"]
    by_resid = markov_test(model, src, tgt, align="left").table
    by_logits = markov_test(model, src, tgt, align="left", compare="logits").table
    assert (by_logits["compared"] == "logits").all()
    columns = ["layer", "kl", "max_abs_dlogit", "bitwise_equal", "control_kl"]
    assert by_resid[columns].equals(by_logits[columns])


def _source_parts(model, src: str, tgt: str):
    src_ids, tgt_ids = model.to_tokens(src), model.to_tokens(tgt)
    n = model.cfg.n_layers
    resid, logits = capture_with_logits(model, src_ids, list(range(n + 1)))
    return src_ids, tgt_ids, {layer: resid[layer] for layer in range(n + 1)}, logits


@pytest.mark.parametrize("compare", ["final_residual", "logits"])
def test_a_shifted_residual_is_caught_and_measured(compare: str, model_for) -> None:
    """Negative control: layer 2 given the source's residual shifted by one position. The
    final residual then differs, so the row's logits are computed: KL > 0, equal either way."""
    model = model_for("llama")
    src, tgt, resid, logits = _source_parts(model, "The quick brown fox", "A lazy sleeping dog")
    resid[2] = resid[2].roll(1, dims=1)
    layers = list(range(model.cfg.n_layers + 1))
    report = _patched_rows(model, src, tgt, layers, resid, logits, model(tgt), compare)
    row = report.table.set_index("layer").loc[2]
    assert not report.passed and not row["bitwise_equal"]
    assert row["compared"] == "logits" and row["kl"] > 1e-3 and row["max_abs_dlogit"] > 0
    direct = kl_divergence(logits, patch_residual(model, tgt, resid[2], layer=2)).max().item()
    assert row["kl"] == pytest.approx(direct, rel=1e-9)  # float32 KL vs float64: same logits
    others = report.table[report.table["layer"] != 2]
    assert others["bitwise_equal"].all()


def test_a_head_that_misses_the_source_logits_forces_logits_everywhere(model_for) -> None:
    """Negative control for the residual route: if the head does not reproduce the source's
    logits from its final residual, no row may stand on a residual comparison."""
    model = model_for("llama")
    src, tgt, resid, logits = _source_parts(model, "abcdefgh", "ijklmnop")
    off = logits.clone()
    off[0, 3, 7] = off[0, 3, 7].nextafter(torch.tensor(float("inf")))  # one ulp, one logit
    layers = list(range(model.cfg.n_layers + 1))
    report = _patched_rows(model, src, tgt, layers, resid, off, model(tgt))
    assert not report.head_reproduces and not report.passed
    assert (report.table["compared"] == "logits").all()
    assert not report.table["bitwise_equal"].any()
    assert (report.table["kl"] < 1e-9).all()  # one ulp of one logit: a difference, a tiny one


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


@pytest.mark.parametrize(("compare", "heads"), [("final_residual", 3), ("logits", None)])
def test_markov_cost_is_about_half_the_forwards(compare: str, heads, model_for) -> None:
    """Blocks below the patched layer are not run: sum over l of (L - l), plus 2 full runs.
    The head runs for the source, the target and the final layer; per layer only if asked."""
    model = model_for("llama")
    n = model.cfg.n_layers
    calls, head = [], []
    hooks = [(f"blocks.{i}.hook_in", lambda act, hook: calls.append(hook.name)) for i in range(n)]
    hooks.append(("unembed.hook_in", lambda act, hook: head.append(hook.name)))
    with model.hooks(fwd_hooks=hooks):
        markov_test(model, "abcdefgh", "ijklmnop", compare=compare)
    # source captured and scored in one run (L) + target (L) + patched runs
    # sum_{l=0..L} (L - l) = L(L+1)/2: (L + 1) / 2 + 2 forward-equivalents
    assert len(calls) == 2 * n + n * (n + 1) // 2
    naive = 3 * n + n * (n + 1)  # a capture run apart, and every patched run doing all L blocks
    assert len(calls) < naive
    assert len(head) == (heads or n + 3)  # source, target, and one per layer 0..L


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


def test_run_to_the_final_norm(model_for) -> None:
    """The final residual of a run patched whole at a layer: the source's, as the Markov
    property says; a layer with no blocks above it is refused by name."""
    model = model_for("qwen3")
    n = model.cfg.n_layers
    src, tgt = model.to_tokens("abcdefgh"), model.to_tokens("ijklmnop")
    resid = residkit.capture_residuals(model, src, layers=[1, n])
    final = run_patched_to_final(model, tgt, resid[0], 1)
    assert torch.equal(final, resid[1])
    # Negative control: the layer-1 residual put in at layer 2 ends elsewhere.
    assert not torch.equal(run_patched_to_final(model, tgt, resid[0], 2), resid[1])
    with pytest.raises(ValueError, match=f"layer {n} has no blocks above it"):
        run_patched_to_final(model, tgt, resid[1], n)


def test_unknown_comparison(model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    with no_leaked_hooks(model), raises_naming("compare", "bits"):
        markov_test(model, "abc", "def", compare="bits")
