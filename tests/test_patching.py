"""Residual patching and batched activation-patching sweeps, against TransformerLens's functions."""

import subprocess
import sys

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tl_patching

import residkit
from residkit.patching import HOOKS, PatchingSweep, patch_residual, patching_sweep
from tests.conftest import Boom, failing_forward, get_real, raises_naming

TL = {
    "resid_pre": tl_patching.get_act_patch_resid_pre,
    "resid_mid": tl_patching.get_act_patch_resid_mid,
    "attn_out": tl_patching.get_act_patch_attn_out,
    "mlp_out": tl_patching.get_act_patch_mlp_out,
    "z": tl_patching.get_act_patch_attn_head_out_by_pos,
}
# Batched rows go through GEMMs of another shape than TL's one-row runs, so they may round
# differently; measured on SmolLM2-135M (benchmarks/patching.py, docs/patching.md) the largest
# difference is 0 to 4e-7 of the largest |value|. 1e-4 leaves room for other BLAS builds and
# still fails for any real difference (a patch in the wrong place moves values by O(1)).
TOLERANCE = 1e-4


def test_final_layer_patch(model_for) -> None:
    model = model_for("gemma3")
    n = model.cfg.n_layers
    resid = residkit.capture_residuals(model, "hello there", layers=[n])[0]
    assert torch.equal(patch_residual(model, "HELLO THERE", resid, layer=n), model("hello there"))


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[0, -1, 100] - logits[0, -1, 101]


@pytest.fixture(scope="module")
def llama_pair(model_for):
    model = model_for("llama")
    clean, corrupted = model.to_tokens("The cat sat on"), model.to_tokens("The dog ran on")
    _, clean_cache = model.run_with_cache(clean)
    return model, clean, corrupted, clean_cache


@pytest.mark.parametrize("hook", HOOKS)
def test_sweep_matches_transformer_lens(hook, llama_pair) -> None:
    model, clean, corrupted, clean_cache = llama_pair
    ref = TL[hook](model, corrupted, clean_cache, _metric).cpu()
    one = patching_sweep(
        model,
        clean,
        corrupted,
        _metric,
        hook=hook,
        batch_size=1,
        reuse_prefix=False,
        progress=False,
    )
    batched = patching_sweep(model, clean, corrupted, _metric, hook=hook, progress=False)
    assert one.values.shape == batched.values.shape == ref.shape
    assert batched.batch_size > 1
    # One whole run per forward from the cached residual: TL's GEMMs, so equal.
    assert torch.equal(one.values, ref)
    assert (batched.values - ref).abs().max().item() <= TOLERANCE * ref.abs().max().item()
    assert ref.abs().max().item() > 0
    # Negative control: the same values one layer off disagree, so the comparison can fail.
    assert not torch.allclose(one.values[1:], ref[:-1], atol=TOLERANCE * ref.abs().max().item())


def test_sweep_skips_blocks_and_batches(llama_pair) -> None:
    model, clean, corrupted, _ = llama_pair
    n, n_pos = model.cfg.n_layers, clean.shape[1]
    sweep = patching_sweep(
        model, clean, corrupted, _metric, batch_size=3, reuse_prefix=False, progress=False
    )
    chunks = -(-n_pos // 3)
    assert sweep.n_forwards == 2 + n * chunks
    # Patches at layer l run blocks l..n-1 only: sum over layers of (n - l) per patched run.
    assert sweep.block_runs == n_pos * n * (n + 1) // 2
    assert sweep.block_positions == sweep.block_runs * n_pos and sweep.batch_size == 3


def test_sweep_result_table_and_figure(llama_pair) -> None:
    model, clean, corrupted, _ = llama_pair
    sweep = patching_sweep(
        model, clean, corrupted, _metric, hook="z", positions=[5, 7], progress=False
    )
    assert isinstance(sweep, PatchingSweep)
    n, heads = model.cfg.n_layers, model.cfg.n_heads
    assert sweep.values.shape == (n, 2, heads)
    table = sweep.table
    assert isinstance(table, pd.DataFrame) and len(table) == n * 2 * heads
    assert table.columns.tolist() == ["layer", "pos", "token", "head", "value"]
    assert sorted(set(table["pos"])) == [5, 7]
    fig = sweep.figure()
    assert fig.data[0].z.shape == (n * heads, 2)
    assert list(fig.data[0].x) == [
        f"{p}: {t!r}" for p, t in zip([5, 7], sweep.str_tokens, strict=True)
    ]
    # Positions 5 and 7 differ between the prompts ("c"/"d", "t"/"g"), so patching them moves
    # the metric. Whole runs one at a time are the same computations whatever else is swept: the subset
    # is exactly the full sweep's columns. The default plan groups them otherwise (rounding).
    exact = {"hook": "z", "batch_size": 1, "reuse_prefix": False, "progress": False}
    some = patching_sweep(model, clean, corrupted, _metric, positions=[5, 7], **exact)
    full = patching_sweep(model, clean, corrupted, _metric, **exact)
    assert torch.equal(some.values, full.values[:, [5, 7]])
    assert not torch.equal(some.values, full.values[:, [6, 7]])  # control: one column off
    scale = some.values.abs().max().item()
    assert (sweep.values - some.values).abs().max().item() <= TOLERANCE * scale


def test_no_resid_mid_on_parallel_blocks(model_for, no_leaked_hooks) -> None:
    model = model_for("gpt_neox")
    with no_leaked_hooks(model), pytest.raises(ValueError, match="'resid_mid' is not a patching"):
        patching_sweep(model, "ab", "cd", lambda x: x.sum(), hook="resid_mid")


@pytest.mark.real_model
def test_real_model_sweep_matches_transformer_lens() -> None:
    """SmolLM2-135M: TL's sweep on a sample of cells, residkit's batched and one-at-a-time."""
    model = get_real("smollm2-135m-instruct")
    clean = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    mary, john = (model.tokenizer.encode(name)[0] for name in (" Mary", " John"))
    corrupted = torch.where(clean == mary, john, torch.where(clean == john, mary, clean))

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, mary] - logits[0, -1, john]

    _, clean_cache = model.run_with_cache(clean)
    # The names' positions (where the prompts differ), one other and the last: four columns
    # of the sweep, so the one-at-a-time sweep is 120 whole runs rather than 480.
    names = (clean[0] != corrupted[0]).nonzero().flatten().tolist()
    positions = sorted({*names, names[0] + 1, clean.shape[1] - 1})
    cells = pd.DataFrame(
        [(layer, positions[i % len(positions)]) for i, layer in enumerate(range(0, 30, 3))],
        columns=["layer", "pos"],
    )
    setter = tl_patching.get_act_patch_attn_out.keywords["patch_setter"]
    ref = tl_patching.generic_activation_patch(
        model, corrupted, clean_cache, metric, setter, "attn_out", index_df=cells
    )
    for batch_size, reuse_prefix in ((1, False), (None, True)):
        sweep = patching_sweep(
            model,
            clean,
            corrupted,
            metric,
            hook="attn_out",
            positions=positions,
            batch_size=batch_size,
            reuse_prefix=reuse_prefix,
            progress=False,
        )
        column = {p: j for j, p in enumerate(positions)}
        ours = torch.stack([sweep.values[r.layer, column[r.pos]] for r in cells.itertuples()])
        scale = sweep.values.abs().max().item()
        assert scale > 1.0  # swapping the names moves the logit difference
        if not reuse_prefix:
            assert torch.equal(ours, ref.cpu())
        else:
            assert (ours - ref.cpu()).abs().max().item() <= TOLERANCE * scale


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
        (lambda m: patching_sweep(m, "ab", "cd", _metric, hook="q"), "hook 'q' is not"),
        (lambda m: patching_sweep(m, "ab", "cd", _metric, positions=[3]), r"positions \[3\]"),
        (lambda m: patching_sweep(m, "ab", "cd", _metric, batch_size=0), "batch_size must"),
        (lambda m: patching_sweep(m, "ab", "cd", lambda x: x[0, -1]), "metric must return"),
        (lambda m: patching_sweep(m, "", "", _metric), "empty"),
        (lambda m: patching_sweep(m, ["ab", "cd"], ["ef", "gh"], _metric), "one prompt each"),
    ],
)
def test_bad_input(call, message, model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    with no_leaked_hooks(model), pytest.raises(ValueError, match=message):
        call(model)


def test_reuse_prefix_must_be_a_bool(model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    with no_leaked_hooks(model), raises_naming("reuse_prefix", "yes"):
        patching_sweep(model, "ab", "cd", _metric, reuse_prefix="yes")


def test_hooks_and_skips_removed_on_error(model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    resid = torch.zeros(1, 3, 64)
    with failing_forward(model), no_leaked_hooks(model), pytest.raises(Boom):
        patch_residual(model, "ab", resid, layer=2)
    with failing_forward(model), no_leaked_hooks(model), pytest.raises(Boom):
        patching_sweep(model, "ab", "cd", _metric, hook="mlp_out", progress=False)
    assert all("forward" not in b.__dict__ for b in model.blocks)


def test_overrides_removed_when_a_batched_forward_fails(model_for, no_leaked_hooks) -> None:
    """A failure inside a forward of patched runs (head override, skipped blocks, a continued
    cache all in place): everything residkit added is gone, and the next sweep is right."""
    model = model_for("llama")
    clean, corrupted = "The cat sat on the mat", "The dog ran on the rug"
    before = patching_sweep(model, clean, corrupted, _metric, progress=False).values

    def fail_in_batches(act: torch.Tensor, hook: object) -> None:
        if act.shape[0] > 1:
            raise Boom("a batched forward failed")

    failing = model.hooks(fwd_hooks=[("blocks.3.hook_resid_pre", fail_in_batches)])
    with no_leaked_hooks(model), pytest.raises(Boom), failing:
        patching_sweep(model, clean, corrupted, _metric, progress=False)
    # The head, the skipped blocks, the MLPs and projections run at some positions only.
    assert not [name for name, m in model.named_modules() if "forward" in m.__dict__]
    assert torch.equal(
        patching_sweep(model, clean, corrupted, _metric, progress=False).values, before
    )


def test_sweep_on_an_unsupported_architecture(model_for, monkeypatch) -> None:
    from residkit import architectures

    model = model_for("llama")
    monkeypatch.setattr(architectures, "_BY_MODEL_TYPE", {})
    with pytest.raises(architectures.UnsupportedArchitectureError, match="no architecture facts"):
        patching_sweep(model, "ab", "cd", _metric, progress=False)


def test_import_and_cli_help_load_no_torch() -> None:
    """``import residkit`` and ``residkit --help`` / ``--version`` import neither torch nor TL."""
    code = (
        "import sys, residkit\n"
        "from residkit.cli import main\n"
        "for flag in ('--help', '--version'):\n"
        "    try:\n"
        "        main([flag])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'transformer_lens', 'plotly', 'pandas') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(residkit.load) and 'torch' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "residkit 0.1.0" in done.stdout and "usage: residkit" in done.stdout


@pytest.mark.parametrize("hook", ["resid_pre", "z"])
@pytest.mark.parametrize("reuse", [True, False])
def test_metric_positions_unembed_only_where_the_metric_reads(hook, reuse, llama_pair) -> None:
    model, clean, corrupted, clean_cache = llama_pair
    ref = TL[hook](model, corrupted, clean_cache, _metric).cpu()
    kw = {"hook": hook, "reuse_prefix": reuse, "progress": False}
    last = patching_sweep(model, clean, corrupted, _metric, metric_positions=[-1], **kw)
    assert (last.values - ref).abs().max().item() <= TOLERANCE * ref.abs().max().item()
    # Control: a metric reading a position it did not name gets NaN, never a number.
    first = patching_sweep(
        model, clean, corrupted, lambda lg: lg[0, 1, 100], metric_positions=[-1], **kw
    )
    if reuse:  # runs patched after position 1 take it from the corrupted run; it is not there
        assert torch.isnan(first.values[:, 2:]).all()
    else:
        assert torch.isnan(first.values).all()
    with raises_naming("metric_positions", [99]):
        patching_sweep(model, clean, corrupted, _metric, metric_positions=[99], **kw)
