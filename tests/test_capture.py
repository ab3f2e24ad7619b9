"""capture_residuals equals run_with_cache bitwise, on every family, and leaves no hooks."""

import pytest
import torch

import residkit
from residkit.architectures import spec_for
from tests.conftest import Boom, failing_forward, get_model

PROMPT = "Residual streams carry everything: 1 + 2 = 3."


def test_equals_run_with_cache_bitwise(family: str, model_for, no_leaked_hooks) -> None:
    model = model_for(family)
    with no_leaked_hooks(model):
        resid = residkit.capture_residuals(model, PROMPT)
    _, cache = model.run_with_cache(PROMPT)
    n = model.cfg.n_layers
    spec = spec_for(model)
    assert resid.shape == (n + 1, 1, model.to_tokens(PROMPT).shape[1], model.cfg.d_model)
    for layer in range(n + 1):
        assert torch.equal(resid[layer], cache[spec.resid_hook(layer, n)])
    # Negative control: a one-layer shift is detected at every layer.
    for layer in range(n):
        assert not torch.equal(resid[layer], cache[spec.resid_hook(layer + 1, n)])


def test_layer_subset_keeps_order(model_for) -> None:
    model = model_for("llama")
    full = residkit.capture_residuals(model, PROMPT)
    part = residkit.capture_residuals(model, PROMPT, layers=[4, 0, 2])
    assert torch.equal(part, full[[4, 0, 2]])


def test_batch_of_prompts_and_token_tensor(model_for) -> None:
    model = model_for("qwen3")
    tokens = model.to_tokens(["abcdef", "ghijkl"])
    by_text = residkit.capture_residuals(model, ["abcdef", "ghijkl"])
    by_tokens = residkit.capture_residuals(model, tokens)
    assert by_text.shape[1] == 2 and torch.equal(by_text, by_tokens)


@pytest.mark.parametrize(
    ("inputs", "kwargs", "message"),
    [
        ("", {}, "empty prompt"),
        ([], {}, "empty list"),
        ("hi", {"layers": [5]}, r"layer\(s\) \[5\] out of range: this model has 4 layers"),
        ("hi", {"layers": [-1]}, "out of range"),
    ],
)
def test_bad_input(inputs, kwargs, message, model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    with no_leaked_hooks(model), pytest.raises(ValueError, match=message):
        residkit.capture_residuals(model, inputs, **kwargs)


def test_a_float_tensor_is_not_token_ids(model_for) -> None:
    with pytest.raises(TypeError, match="must be an integer tensor"):
        residkit.capture_residuals(model_for("llama"), torch.zeros(1, 3))


def test_hooks_removed_when_forward_raises(model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    with failing_forward(model), no_leaked_hooks(model), pytest.raises(Boom):
        residkit.capture_residuals(model, "ab")


def test_a_list_of_prompts_is_left_padded_with_its_mask() -> None:
    """Each row's real positions hold its prompt alone's residuals (to the last bits: a batch
    runs other GEMM shapes; 2e-5 measured on zoo llama, bounded here by tests/test_batch.py's
    ROW_VS_ALONE), not residuals that attended to padding."""
    from tests.test_batch import ROW_VS_ALONE

    model = get_model("llama")
    short, long = "hi there", "a much longer prompt than that"
    batch = residkit.capture_residuals(model, [short, long])
    alone = residkit.capture_residuals(model, short)
    n = alone.shape[2]
    assert (batch[:, 0, -n:] - alone[:, 0]).abs().max().item() < ROW_VS_ALONE
    assert torch.equal(batch[:, 1], residkit.capture_residuals(model, long)[:, 0])
    # Control: the same ids without the mask let the short row attend to its padding.
    ids = model.to_tokens([short, long])
    unmasked = residkit.capture_residuals(model, ids)
    assert (unmasked[-1, 0, -n:] - alone[-1, 0]).abs().max().item() > 100 * ROW_VS_ALONE


def test_residual_norm_figure_is_not_saturated_by_one_large_token() -> None:
    import numpy as np

    from residkit.viz import residual_norm_figure

    resid = torch.ones(3, 1, 5, 8)
    resid[:, 0, 0] *= 300.0  # SmolLM2's first token measured up to 171x the others' median
    resid[:, 0, 1:] *= torch.linspace(1.0, 4.0, 4).reshape(1, 4, 1)  # the rest spread 1-4x

    def share(fig) -> float:
        """The colour range the positions after the first one span, as a share of the whole."""
        z = np.asarray(fig.data[0].z)
        return float((z[:, 1:].max() - z[:, 1:].min()) / (z.max() - z.min()))

    log, linear = residual_norm_figure(resid), residual_norm_figure(resid, scale="linear")
    assert share(log) > 0.2  # the spread among the others is visible
    assert share(linear) < 0.02  # control: on a linear scale they are one colour
    assert np.allclose(np.asarray(log.data[0].customdata), resid[:, 0].norm(dim=-1).numpy())
