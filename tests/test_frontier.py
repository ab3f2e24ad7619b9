"""kvdirect_frontier: every plan's bytes and recompute FLOPs from the config, checked against
the tensors and against torch's operation counter; the Pareto front; memory-limited plans."""

import pytest

import residkit
from residkit.policies.plans import candidates, choose, resolve
from residkit.zoo import PAPER_CONFIGS, config_for
from tests.conftest import get_model


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gpt_neox"])
def test_predictions_equal_tensors_and_counted_flops(family: str) -> None:
    model = get_model(family)
    frontier = residkit.kvdirect_frontier(
        model, context=48, budget=8, measure=True, steps=1, progress=False
    )
    t = frontier.table
    assert (t["bytes"] == t["measured_bytes"]).all()
    # Counted over one step in fast mode, minus the full cache's step: GEMMs only, as predicted.
    assert (t["counted_flops"] == t["recompute_flops"]).all()
    assert t.loc[t["plan"] == "full cache", "recompute_flops"].item() == 0
    assert t["pareto"].any() and (t["time_vs_full"] > 0).all()
    assert len(frontier.figure().data) == 2


def test_counting_detects_a_wrong_prediction() -> None:
    # Negative control: the prediction for one evicted token more is another number.
    from residkit._bridge import hf_config
    from residkit.policies.plans import plan_flops

    model = get_model("llama")
    config = hf_config(model)
    plan = resolve(list(range(model.cfg.n_layers)), "stride", 2)
    assert plan_flops(plan, config, 40) != plan_flops(plan, config, 39)


def test_paper_configs_are_computed_without_weights() -> None:
    for key, entry in PAPER_CONFIGS.items():
        config = config_for(entry["family"], config=key)
        t = residkit.kvdirect_frontier(config, context=1024, budget=64).table
        full = t[t["plan"] == "full cache"].iloc[0]
        assert full["pareto"] and full["bytes_vs_full"] == 1.0
        # The paper's layer checkpoints are dominated by the full cache on every GQA config.
        assert not t[t["plan"] == "layer"]["pareto"].item(), key
    with pytest.raises(ValueError, match="measure=True needs a model"):
        residkit.kvdirect_frontier(config, measure=True)


def test_candidates_cover_layer_stride_and_token() -> None:
    names = [c.plan.name for c in candidates(list(range(8)))]
    assert names[0] == "full cache" and names[1] == "layer" and names[-1] == "token"
    assert "stride 2" in names and "stride 8, top 7 kept" in names


def test_choose_takes_the_least_recompute_that_fits() -> None:
    from residkit._bridge import hf_config
    from residkit.architectures import spec_for

    model = get_model("llama")
    config, spec = hf_config(model), spec_for(model)
    assert choose(config, spec, 256, 8, 10**12, 8).kwargs is None  # the full cache fits
    with pytest.raises(ValueError, match="smallest any plan can meet"):
        choose(config, spec, 256, 8, 10, 8)


def test_bad_arguments_are_named() -> None:
    model = get_model("llama")
    with pytest.raises((TypeError, ValueError), match="context"):
        residkit.kvdirect_frontier(model, context=0)
    with pytest.raises((TypeError, ValueError), match="budget"):
        residkit.kvdirect_frontier(model, budget=-1)
    with pytest.raises(residkit.UnsupportedArchitectureError):
        residkit.kvdirect_frontier(config_for("llama").__class__(model_type="bert"))
