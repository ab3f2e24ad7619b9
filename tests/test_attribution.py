"""Attribution patching (:mod:`residkit.patching.attribution`): the estimate is the gradient
times the difference, computed here by a different route, and it is the model's real gradient
(finite differences in float64)."""

import pytest
import torch

import residkit
from residkit.architectures import spec_for
from residkit.patching import patching_sweep
from residkit.patching.attribution import attribution_sweep
from tests.conftest import get_model, raises_naming

CLEAN, CORRUPT = "The cat sat on", "The dog ran on"


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 100] - logits[:, -1, 101]


def _point(model, hook: str, layer: int) -> str:
    spec = spec_for(model)
    return (
        spec.resid_hook(layer, model.cfg.n_layers)
        if hook == "resid_pre"
        else spec.patch_hook(hook, layer)
    )


def _by_hand(model, hook: str, layer: int, scale: float = 1.0):
    """Baseline, the metric's gradient with respect to an added zero at the point (another
    route than the sweep's, which reads the activation itself), and clean - corrupted there."""
    point = _point(model, hook, layer)
    clean_t, corrupt_t = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    seen = {}
    with (
        torch.no_grad(),
        model.hooks(fwd_hooks=[(point, lambda a, hook: seen.update(c=a.clone()))]),
    ):
        model(clean_t)
    with (
        torch.no_grad(),
        model.hooks(fwd_hooks=[(point, lambda a, hook: seen.update(k=a.clone()))]),
    ):
        base = _metric(model(corrupt_t))
    delta = torch.zeros_like(seen["k"], requires_grad=True)
    with torch.enable_grad(), model.hooks(fwd_hooks=[(point, lambda a, hook: a + delta)]):
        (grad,) = torch.autograd.grad(_metric(model(corrupt_t)).sum(), [delta])
    return base, grad, seen["c"] - seen["k"]


@pytest.mark.parametrize("hook", ["resid_pre", "resid_mid", "attn_out", "mlp_out", "z"])
def test_estimate_is_gradient_times_difference(hook) -> None:
    model = get_model("llama")
    est = attribution_sweep(model, CLEAN, CORRUPT, _metric, hook=hook)
    for layer in (0, model.cfg.n_layers - 1):
        base, grad, diff = _by_hand(model, hook, layer)
        hand = base + (grad * diff)[0].sum(-1)  # [pos] (z: [pos, head])
        # Same products, summed in another order: float32 rounding only.
        assert torch.allclose(est.values[layer], hand, rtol=1e-5, atol=1e-5)
        assert est.baseline == pytest.approx(base.item(), abs=1e-6)
        # Controls: the wrong sign and a shifted position are both caught.
        wrong = base - (grad * diff)[0].sum(-1)
        assert not torch.allclose(est.values[layer], wrong, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(est.values[layer][1:], hand[:-1], rtol=1e-5, atol=1e-5)


def test_the_gradient_is_the_model_s_own_by_finite_differences() -> None:
    model = residkit.load("zoo:llama", dtype=torch.float64)
    est = attribution_sweep(model, CLEAN, CORRUPT, _metric, hook="attn_out")
    layer, pos, eps = 1, 8, 1e-2
    point = _point(model, "attn_out", layer)
    _, _, diff = _by_hand(model, "attn_out", layer)

    def moved(sign: float) -> float:
        step = torch.zeros_like(diff)
        step[0, pos] = sign * eps * diff[0, pos]
        with torch.no_grad(), model.hooks(fwd_hooks=[(point, lambda a, hook: a + step)]):
            return _metric(model(model.to_tokens(CORRUPT))).item()

    slope = (moved(1.0) - moved(-1.0)) / (2 * eps)
    # A central difference. Even in float64 some steps of the forward round like float32
    # (measured: the quotient moves by 0.06%, 0.5% and 4% at eps 1e-3, 1e-4 and 1e-5), so eps
    # is 1e-2, where rounding is small against the step and the O(eps^2) error too: they
    # agreed to 9e-5 relative here; 5e-4 leaves room for other BLAS builds.
    assert slope == pytest.approx(est.effects[layer, pos].item(), rel=5e-4, abs=1e-6)
    assert slope != pytest.approx(-est.effects[layer, pos].item(), rel=1e-4)  # control: sign
    assert abs(slope) > 1e-3  # the cell has an effect to get wrong


def test_pairs_in_a_batch_each_get_their_own_estimate() -> None:
    model = get_model("llama")
    pairs = [("The cat sat on", "The dog ran on"), ("A bird flew up", "A fish swam up")]
    one = [attribution_sweep(model, c, k, _metric).values for c, k in pairs]
    both = attribution_sweep(model, [c for c, _ in pairs], [k for _, k in pairs], _metric)
    assert torch.allclose(both.values, (one[0] + one[1]) / 2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both.values, one[0], rtol=1e-5, atol=1e-5)  # control


def test_bad_input_is_named_and_leaves_no_hooks(no_leaked_hooks) -> None:
    model = get_model("llama")
    with no_leaked_hooks(model):
        with raises_naming("hook", "q"):
            attribution_sweep(model, CLEAN, CORRUPT, _metric, hook="q")
        with raises_naming("correction", "cubic"):
            attribution_sweep(model, CLEAN, CORRUPT, _metric, correction="cubic")
        with pytest.raises(ValueError, match="one value per prompt pair"):
            attribution_sweep(model, CLEAN, CORRUPT, lambda lg: lg[0, -1])
        with pytest.raises(ValueError, match="same token length"):
            attribution_sweep(model, CLEAN, "The dog", _metric)


def test_exact_and_estimate_share_the_baseline() -> None:
    model = get_model("llama")
    exact = patching_sweep(model, CLEAN, CORRUPT, _metric, progress=False)
    est = attribution_sweep(model, CLEAN, CORRUPT, _metric)
    assert exact.baseline == pytest.approx(est.baseline, abs=1e-5)
    assert exact.values.shape == est.values.shape and est.method == "attribution"


def test_compare_sweeps_measures_agreement_and_catches_flips() -> None:
    import dataclasses

    from residkit.patching import compare_sweeps

    model = get_model("llama")
    exact = patching_sweep(model, CLEAN, CORRUPT, _metric, progress=False)
    same = compare_sweeps(exact, exact, top_k=5).summary
    assert same["spearman"] == 1.0 and same["top_5_overlap"] == 1.0 and same["sign_flips"] == 0
    assert same["max_abs_error"] == 0.0
    # Control: every effect negated is caught as flips and an inverted ranking.
    negated = dataclasses.replace(exact, values=2 * exact.baseline - exact.values)
    bad = compare_sweeps(exact, negated).summary
    assert bad["spearman"] < 0 and bad["sign_flips"] > 0
    big = (exact.effects.abs() >= 0.05 * exact.effects.abs().max()).sum().item()
    assert bad["sign_flips"] == big
    est = attribution_sweep(model, CLEAN, CORRUPT, _metric)
    cmp = compare_sweeps(exact, est)
    assert len(cmp.table) == exact.values.numel() and "spearman" in repr(cmp)
    assert [t.type for t in cmp.figure().data] == ["heatmap"] * 3
    with pytest.raises(ValueError, match="the sweeps differ"):
        compare_sweeps(exact, attribution_sweep(model, CLEAN, CORRUPT, _metric, hook="z"))
    with raises_naming("top_k", 0):
        compare_sweeps(exact, est, top_k=0)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_the_qk_fix_s_pattern_change_is_the_patched_run_s(family) -> None:
    """The closed form of ``qk_fix`` against brute force: the patched run's pattern at the
    block, read from the model with the clean query and key put in at position p."""
    from residkit.patching.qk_fix import _exact_change, _heads, score_hooks

    model = get_model(family)
    layer, n_heads = 1, model.cfg.n_heads
    q_name, k_name, s_name, a_name = score_hooks(model, layer)
    clean_t, corrupt_t = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    _, clean = model.run_with_cache(clean_t, names_filter=[q_name, k_name])
    _, corrupt = model.run_with_cache(corrupt_t, names_filter=[q_name, k_name, s_name, a_name])
    grad = torch.randn(
        corrupt[a_name][0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    h = lambda x: _heads(x[0].double(), n_heads)  # noqa: E731
    formula = _exact_change(h(corrupt[q_name]), h(corrupt[k_name]), h(clean[q_name]),
                            h(clean[k_name]), corrupt[s_name][0].double(),
                            corrupt[a_name][0].double(), grad, layer)  # fmt: skip
    brute = []
    for p in range(corrupt_t.shape[1]):

        def put(act, hook, name, p=p):
            act = act.clone()
            act[:, p] = clean[name][:, p]
            return act

        seen: dict[str, torch.Tensor] = {}
        hooks = [(q_name, lambda a, hook: put(a, hook, q_name)),
                 (k_name, lambda a, hook: put(a, hook, k_name)),
                 (a_name, lambda a, hook, seen=seen: seen.update(a=a.clone()))]  # fmt: skip
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(corrupt_t)
        brute.append((grad * (seen["a"][0].double() - corrupt[a_name][0].double())).sum())
    brute = torch.stack(brute)
    assert brute.abs().max() > 1e-3  # the patches move the pattern
    # float32 patterns from the model against the float64 closed form: 1e-5 of the largest.
    assert torch.allclose(formula, brute, atol=1e-5 * brute.abs().max().item() + 1e-6)
    assert not torch.allclose(formula[1:], brute[:-1], atol=1e-3 * brute.abs().max().item())


def test_the_qk_fix_is_refused_off_the_residual_and_on_soft_capped_scores() -> None:
    model = get_model("llama")
    with pytest.raises(ValueError, match="resid_pre' only"):
        attribution_sweep(model, CLEAN, CORRUPT, _metric, hook="attn_out", correction="qk")
    est = attribution_sweep(model, CLEAN, CORRUPT, _metric, correction="qk")
    assert est.method == "attribution*" and torch.isfinite(est.values).all()
    with pytest.raises(ValueError, match=r"not scale \* q\.k"):
        attribution_sweep(get_model("gemma2"), CLEAN, CORRUPT, _metric, correction="qk")


def test_the_qk_fix_removes_exactly_the_query_and_key_paths_of_the_estimate() -> None:
    """Its subtracted term against another route: the gradient with block l's query and key
    detached, whose estimate lacks exactly those paths."""
    from residkit.patching.attribution import _per_row
    from residkit.patching.qk_fix import qk_terms, score_hooks

    model = get_model("llama")
    clean_t, corrupt_t = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    linear, _ = qk_terms(model, clean_t, corrupt_t, _metric, _per_row)
    layer = 1
    q_name, k_name, _, _ = score_hooks(model, layer)
    _, grad, diff = _by_hand(model, "resid_pre", layer)
    point = _point(model, "resid_pre", layer)
    delta = torch.zeros_like(diff, requires_grad=True)
    cut = [(point, lambda a, hook: a + delta), (q_name, lambda a, hook: a.detach()),
           (k_name, lambda a, hook: a.detach())]  # fmt: skip
    with torch.enable_grad(), model.hooks(fwd_hooks=cut):
        (without,) = torch.autograd.grad(_metric(model(corrupt_t)).sum(), [delta])
    expected = ((grad - without) * diff)[0].sum(-1)
    assert expected.abs().max() > 1e-4  # the query and key paths carry some of the estimate
    assert torch.allclose(linear[layer, 0], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(linear[layer + 1, 0], expected, rtol=1e-4, atol=1e-5)  # control


def test_empty_prompts_unsupported_families_and_bf16(model_for, no_leaked_hooks) -> None:
    """An empty prompt is refused by name; a family without architecture facts is refused
    like the exact sweep; in bf16 the estimate is computed in the model's dtype and is close
    to float32's (bf16 keeps 8 bits of mantissa: 2**-8 of the largest |value| per rounding,
    over a forward and a backward of a 4-layer model; 0.1 is that with room, while a wrong
    sign or position moves values by O(1) of it)."""
    from residkit import architectures

    model = model_for("llama")
    with no_leaked_hooks(model), pytest.raises(ValueError, match="empty prompt"):
        attribution_sweep(model, "", "", _metric)
    f32 = attribution_sweep(model, "The cat sat", "The dog sat", _metric)
    half = model_for("llama", dtype=torch.bfloat16)
    with no_leaked_hooks(half):
        b16 = attribution_sweep(half, "The cat sat", "The dog sat", _metric)
    scale = f32.effects.abs().max().item()
    assert scale > 0 and torch.isfinite(b16.values).all()
    assert (b16.effects - f32.effects).abs().max().item() <= 0.1 * scale
    assert not torch.allclose(-b16.effects, f32.effects, atol=0.1 * scale)  # control: the sign
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(architectures, "_BY_MODEL_TYPE", {})
        with pytest.raises(architectures.UnsupportedArchitectureError):
            attribution_sweep(model, "ab", "cd", _metric)
