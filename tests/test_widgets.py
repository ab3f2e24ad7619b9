"""The patching explorer, driven from Python (the browser test drives it in JupyterLab)."""

import pytest
import torch

from residkit.patching import patched_logits, patching_sweep
from residkit.widgets import PatchingExplorer, patching_explorer


def test_patching_explorer_follows_its_controls(model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    with no_leaked_hooks(model):
        app = patching_explorer(model, "The cat sat", "The dog sat", answer=5, wrong=6)
        assert isinstance(app, PatchingExplorer)
        first = list(app.heatmap.data[0].z[0])
        app.hook_picker.value = "attn_out"
        assert list(app.heatmap.data[0].z[0]) != first
        assert set(app.sweeps) == {("resid_pre", "logit_diff"), ("attn_out", "logit_diff")}
        app.metric_picker.value = "kl"
        assert (app.sweep.values >= 0).all()
        app.select(1, 2)
    ref = patching_sweep(
        model,
        "The cat sat",
        "The dog sat",
        lambda x: x[0, -1, 5] - x[0, -1, 6],
        hook="attn_out",
        progress=False,
    )
    assert torch.equal(app.sweeps[("attn_out", "logit_diff")].values, ref.values)
    assert "layer 1, position 2" in app.status.value
    assert app.table.value.count("<tr>") == 1 + app.top_k
    logits = patched_logits(model, "The cat sat", "The dog sat", hook="attn_out", layer=1, pos=2)
    top = model.to_string([int(torch.softmax(logits[0, -1].double(), -1).argmax())])
    assert repr(top).replace("'", "&#x27;") in app.table.value or repr(top) in app.table.value


def test_patching_explorer_shows_the_estimate_and_its_error(model_for, no_leaked_hooks) -> None:
    import numpy as np

    from residkit.patching import attribution_sweep

    model = model_for("llama")
    with no_leaked_hooks(model):
        app = patching_explorer(model, "The cat sat", "The dog sat", answer=5, wrong=6)
        exact_z = np.array(app.heatmap.data[0].z, dtype=float)
        app.view_picker.value = "estimate"
        est = attribution_sweep(
            model, "The cat sat", "The dog sat", lambda x: x[0, -1, 5] - x[0, -1, 6]
        )
        assert np.allclose(np.array(app.heatmap.data[0].z, dtype=float), est.values.numpy())
        assert "estimate" in app.status.value
        app.view_picker.value = "error"
        error_z = np.array(app.heatmap.data[0].z, dtype=float)
        assert np.allclose(error_z, est.values.numpy() - exact_z, atol=1e-5)
        assert "spearman" in app.heatmap.layout.title.text
        app.view_picker.value = "exact"  # control: back to the exact values
        assert np.allclose(np.array(app.heatmap.data[0].z, dtype=float), exact_z)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"corrupted": "The dogs"}, "same token length"),
        ({"answer": "two words"}, "pass one token"),
        ({"wrong": 10**6}, "outside the vocabulary"),
        ({"top_k": 0}, "top_k must be"),
    ],
)
def test_patching_explorer_bad_input(kwargs, message, model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    args = {"clean": "The cat", "corrupted": "The dog", **kwargs}
    with no_leaked_hooks(model), pytest.raises(ValueError, match=message):
        patching_explorer(model, **args)


def test_patched_logits_checks_its_cell(model_for) -> None:
    model = model_for("llama")
    with pytest.raises(ValueError, match="layer 9 out of range"):
        patched_logits(model, "ab", "cd", layer=9, pos=0)
    with pytest.raises(ValueError, match="head is needed for hook='z'"):
        patched_logits(model, "ab", "cd", hook="z", layer=0, pos=0)
