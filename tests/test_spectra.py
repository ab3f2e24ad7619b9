"""W_Q W_K^T spectra: factored SVD == explicit SVD, GQA mapping, norm folding, ranks, widget."""

import math
import re

import numpy as np
import pytest
import torch
from plotly.callbacks import InputDeviceState, Points

import residkit
from residkit import zoo
from residkit._bridge import cached_forward, hf_model, layer_kv, new_cache
from residkit.architectures import spec_for
from residkit.spectra import (
    QKSpectra,
    explicit_qk_svdvals,
    kv_head_of,
    qk_singular_values,
    qk_spectra,
)
from residkit.viz.spectra import rank_heatmap, spectrum
from residkit.widgets import rank_explorer

GQA_FAMILIES = ["llama", "qwen3", "gemma3", "phi3"]


def _weights(model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    attn = model.blocks[layer].attn
    return attn.W_Q.detach().double(), attn.W_K.detach().double()


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref[0])


def test_bridge_weights_reproduce_the_model_projections(family: str, model_for) -> None:
    """W_Q / W_K (fused QKV split by the bridge included) give the q and k the model computes.

    Input: the residual after the pre-attention norm (the raw residual for OLMo 2). The hook
    values are pre-rotary and pre-QK-norm, which is the form M_h describes. Independently of
    the bridge's hooks, rotary preserves each key's norm, so where there is no QK-norm
    ``x W_K + b`` must have the norms of the keys in HF's own cache.
    """
    model = model_for(family)
    spec = spec_for(model)
    tokens = model.to_tokens("keys are residual projections")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        hf_keys = new_cache(model)
        cached_forward(model, tokens, hf_keys)
    for layer in range(model.cfg.n_layers):
        x = cache[f"blocks.{layer}.attn.hook_in"]
        source = (
            f"blocks.{layer}.ln1.hook_out"
            if spec.attn_norm_path is not None
            else f"blocks.{layer}.hook_resid_pre"
        )
        assert torch.equal(x, cache[source])
        attn = model.blocks[layer].attn
        projected = {}
        for name, w, b in (("q", attn.W_Q, attn.b_Q), ("k", attn.W_K, attn.b_K)):
            got = torch.einsum("bpd,hde->bphe", x, w.detach())
            projected[name] = got if b is None else got + b.detach()
            ref = cache[f"blocks.{layer}.attn.hook_{name}"]
            torch.testing.assert_close(projected[name], ref, rtol=1e-5, atol=1e-5)
        if spec.k_norm is None:  # QK-norm fixes key norms: nothing to compare there
            hf = layer_kv(hf_keys, layer)[0]  # [batch, kv_head, pos, d_head]
            kept = hf.shape[2]  # sliding-window layers keep only the window's tail
            k_norms = projected["k"].transpose(1, 2)[:, :, -kept:].norm(dim=-1)
            torch.testing.assert_close(k_norms, hf.norm(dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "gpt2", "gpt_neox", "phi3"])
def test_factored_equals_explicit_svd(family: str, model_for) -> None:
    model = model_for(family)
    spectra = qk_spectra(model)
    group = spectra.n_heads // spectra.n_kv_heads
    assert spectra.singular_values.dtype == torch.float64
    for layer in range(spectra.n_layers):
        w_q, w_k = _weights(model, layer)
        for head in range(spectra.n_heads):
            got = spectra.singular_values[layer, head]
            ref = torch.linalg.svdvals(w_q[head] @ w_k[head // group].T)
            assert _rel_err(got, ref[: spectra.d_head]) < 1e-10
            assert torch.all(got[:-1] >= got[1:])  # descending


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_gqa_head_mapping(family: str, model_for) -> None:
    """Query head h reads KV head h // group; the modulo mapping (a classic bug) differs."""
    model = model_for(family)
    spectra = qk_spectra(model)
    n_heads, n_kv = spectra.n_heads, spectra.n_kv_heads
    assert 1 < n_kv < n_heads
    expected = [h // (n_heads // n_kv) for h in range(n_heads)]
    assert spectra.kv_heads == expected == [kv_head_of(h, n_heads, n_kv) for h in range(n_heads)]
    assert spectra.table["kv_head"].tolist() == expected * spectra.n_layers
    w_q, w_k = _weights(model, 1)
    misread = [h for h in range(n_heads) if h % n_kv != expected[h]]
    assert misread
    for head in range(n_heads):
        got = spectra.singular_values[1, head]
        right = explicit_qk_svdvals(w_q[head], w_k[expected[head]])
        assert _rel_err(got, right) < 1e-10
        if head in misread:
            wrong = explicit_qk_svdvals(w_q[head], w_k[head % n_kv])
            assert _rel_err(got, wrong) > 1e-3


def test_qk_singular_values_rejects_bad_grouping() -> None:
    with pytest.raises(ValueError, match="n_heads=3 is not a multiple of n_kv_heads=2"):
        qk_singular_values(torch.randn(1, 3, 8, 4), torch.randn(1, 2, 8, 4))


def test_qk_singular_values_pads_when_d_model_is_below_d_head() -> None:
    w_q, w_k = torch.randn(1, 2, 4, 6), torch.randn(1, 1, 4, 6)
    sv = qk_singular_values(w_q, w_k)
    assert sv.shape == (1, 2, 6)
    assert torch.equal(sv[..., 4:], torch.zeros(1, 2, 2, dtype=sv.dtype))
    assert _rel_err(sv[0, 1], explicit_qk_svdvals(w_q[0, 1], w_k[0, 0])) < 1e-10


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_fold_norm_folds_the_gain(family: str, tmp_path) -> None:
    """On a private model with a random norm gain: folding changes the spectra and equals
    the explicit product diag(g) W_Q W_K^T diag(g), g = w + norm_offset."""
    model = residkit.load(zoo.build(family, root=tmp_path, seed=3))
    spec = spec_for(model)
    layers = hf_model(model).model.layers
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers:
            norm = getattr(layer, spec.attn_norm_path)
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) * 2 - 0.5)
    plain, folded = qk_spectra(model), qk_spectra(model, fold_norm=True)
    assert not plain.norm_folded and folded.norm_folded and folded.fold_norm
    assert not torch.allclose(plain.singular_values, folded.singular_values, rtol=1e-3)
    group = folded.n_heads // folded.n_kv_heads
    for layer in range(folded.n_layers):
        w_q, w_k = _weights(model, layer)
        weight = getattr(layers[layer], spec.attn_norm_path).weight.detach().double()
        g = (weight + spec.norm_offset)[:, None]
        for head in range(folded.n_heads):
            ref = explicit_qk_svdvals(g * w_q[head], g * w_k[head // group])
            assert _rel_err(folded.singular_values[layer, head], ref) < 1e-10
    if spec.norm_offset:  # negative control: forgetting Gemma's 1 + w is visible
        w_q, w_k = _weights(model, 0)
        weight = getattr(layers[0], spec.attn_norm_path).weight.detach().double()[:, None]
        wrong = explicit_qk_svdvals(weight * w_q[0], weight * w_k[0])
        assert _rel_err(folded.singular_values[0, 0], wrong) > 1e-3


def test_fold_norm_is_a_flagged_no_op_without_a_pre_norm(model_for) -> None:
    model = model_for("olmo2")
    plain, folded = qk_spectra(model), qk_spectra(model, fold_norm=True)
    assert folded.fold_norm and not folded.norm_folded
    assert any("no pre-attention norm" in note for note in folded.notes)
    assert torch.equal(plain.singular_values, folded.singular_values)


def _synthetic(values: list[list[float]]) -> QKSpectra:
    sv = torch.tensor(values, dtype=torch.float64)[None]  # [1 layer, heads, d_head]
    return QKSpectra(
        sv, "synthetic", "llama", n_heads=sv.shape[1], n_kv_heads=1, d_head=sv.shape[2], d_model=8
    )


def test_effective_rank_definition_and_edges() -> None:
    # head 0: sigma^2 shares 9/14, 4/14, 1/14; sigma shares 3/6, 2/6, 1/6.
    # head 1: 1e-13 < 1e-12 * sigma_max is rounding, not a direction. head 2: all zero.
    spectra = _synthetic([[3, 2, 1, 0], [1, 1e-13, 0, 0], [0, 0, 0, 0]])

    def ranks(energy: float, measure: str = "sigma2") -> list[int]:
        return spectra.effective_rank(energy, measure=measure)["rank"].tolist()

    assert ranks(0) == ranks(0.0) == [0, 0, 0]
    assert ranks(1) == ranks(1.0) == [3, 1, 0]
    assert ranks(1, "sigma") == [3, 1, 0]
    assert ranks(0.5) == [1, 1, 0]
    assert ranks(9 / 14 - 1e-9) == [1, 1, 0]
    assert ranks(9 / 14 + 1e-9) == [2, 1, 0]
    assert ranks(0.9) == [2, 1, 0]  # 13/14 = 0.93
    assert ranks(0.95) == [3, 1, 0]
    assert ranks(0.5, "sigma") == [1, 1, 0]
    assert ranks(0.9, "sigma") == [3, 1, 0]  # 5/6 = 0.83
    assert spectra.effective_rank(0.9)["rank_fraction"].tolist() == [0.5, 0.25, 0.0]
    assert ranks(np.float32(0.5)) == [1, 1, 0]  # numpy scalars are numbers too


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, math.inf, "0.9", None, True, [0.9]])
def test_bad_energy_is_a_value_error_naming_it(bad: object) -> None:
    spectra = _synthetic([[2, 1]])
    with pytest.raises(ValueError, match=r"energy must be .*got " + re.escape(repr(bad))):
        spectra.effective_rank(bad)
    with pytest.raises(ValueError, match="energy"):
        rank_heatmap(spectra, bad)


def test_unknown_measure() -> None:
    with pytest.raises(ValueError, match="unknown measure 'entropy'; choose one of sigma2, sigma"):
        _synthetic([[2, 1]]).effective_rank(0.9, measure="entropy")


def test_tables_and_figures(model_for) -> None:
    spectra = qk_spectra(model_for("llama"))
    table = spectra.effective_rank(0.9)
    assert list(table.columns) == ["layer", "head", "kv_head", "rank", "rank_fraction"]
    assert table.equals(spectra.table)
    assert len(table) == spectra.n_layers * spectra.n_heads
    per_kv = spectra.per_kv_head(0.9)
    assert len(per_kv) == spectra.n_layers * spectra.n_kv_heads
    expected = table.groupby(["layer", "kv_head"])["rank"].agg(["mean", "max"]).reset_index()
    assert per_kv["mean_rank"].tolist() == expected["mean"].tolist()
    assert per_kv["max_rank"].tolist() == expected["max"].tolist()
    fig = spectra.figure(energy=0.9)
    assert fig.data[0].z.shape == (spectra.n_layers, spectra.n_heads)
    assert np.allclose(fig.data[0].z.flatten(), table["rank_fraction"])
    sv = spectra.singular_values.numpy()
    assert np.allclose(fig.data[0].customdata[..., 2:], sv[..., :3])
    one = spectrum(spectra, 2, 3, energy=0.9)
    assert np.allclose(one.data[0].y, sv[2, 3])
    assert one.data[1].y[-1] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("layer", "head", "match"),
    [(4, 0, r"layer 4 out of range.*valid layers are 0\.\.3"), (0, -1, r"valid heads are 0\.\.3")],
)
def test_spectrum_rejects_bad_layer_or_head(model_for, layer: int, head: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        spectrum(qk_spectra(model_for("llama")), layer, head)


def test_rank_explorer_updates_in_place(model_for) -> None:
    app = rank_explorer(
        {"llama": qk_spectra(model_for("llama")), "gpt2": qk_spectra(model_for("gpt2"))}
    )
    trace, line = app.heatmap.data[0], app.spectrum.data[0]

    z = np.array(trace.z)
    app.slider.value = 0.3
    assert app.heatmap.data[0] is trace  # restyled, not replaced
    assert not np.array_equal(np.array(trace.z), z)

    custom = np.array(trace.customdata)
    app.dropdown.value = "gpt2"
    assert app.heatmap.data[0] is trace
    assert not np.array_equal(np.array(trace.customdata), custom)
    assert "gpt2" in app.heatmap.layout.title.text

    app.measure.value = "sigma"
    assert "\u03a3\u03c3" in app.heatmap.layout.title.text
    assert "\u03a3\u03c3" in app.spectrum.data[1].name

    y = np.array(line.y)
    app.head_picker.value = 2
    assert app.spectrum.data[0] is line
    assert not np.array_equal(np.array(line.y), y)
    assert "head 2" in app.status.value

    # A click on the heatmap cell (layer 3, head 1) selects that head.
    y = np.array(line.y)
    trace._dispatch_on_click(Points(xs=[1], ys=[3], trace_index=0), InputDeviceState())
    assert (app.layer_picker.value, app.head_picker.value) == (3, 1)
    assert not np.array_equal(np.array(line.y), y)
    assert "layer 3 head 1" in app.spectrum.layout.title.text


def test_rank_explorer_clears_what_the_next_model_leaves_unset() -> None:
    """Cell text is drawn only on small grids; switching to a large model must drop it."""
    small = _synthetic([[3, 2, 1, 0]] * 4)
    big = QKSpectra(torch.ones(40, 16, 4, dtype=torch.float64), "big", "llama", 16, 16, 4, 8)
    app = rank_explorer({"small": small, "big": big})
    assert app.heatmap.data[0].text is not None
    app.dropdown.value = "big"
    assert app.heatmap.data[0].text is None and app.heatmap.data[0].z.shape == (40, 16)
    assert (app.layer_picker.options[-1], app.head_picker.options[-1]) == (39, 15)


def test_rank_explorer_rejects_an_empty_dict() -> None:
    with pytest.raises(ValueError, match="empty dict"):
        rank_explorer({})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_hooks_left(family: str, model_for, no_leaked_hooks) -> None:
    model = model_for(family)
    with no_leaked_hooks(model):
        qk_spectra(model, fold_norm=True).figure()
