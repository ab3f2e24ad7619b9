"""How a sweep's runs are grouped (residkit.patching.chunks), and that the grouping changes
nothing but the rounding: against TransformerLens across a sliding window, positions before
each patch taken from the corrupted run, and the work it saves."""

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tl_patching

from residkit.patching import HOOKS, patching_sweep
from residkit.patching import chunks as chunks_module
from residkit.patching.chunks import plan
from tests.conftest import get_real
from tests.test_patching import TL, TOLERANCE

# Longer than the zoo's 8-token sliding window, so later forwards continue a cache that has
# already dropped its oldest tokens on the windowed layers.
LONG = "The quick brown fox jumps over the lazy dog near the river bank"
OTHER = "A small green frog leaps under the tall oak tree by the quiet lake"


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[0, -1, 100] - logits[0, -1, 101]


def _cells(chunks):
    return [(c.layer, c.index, c.head) for chunk in chunks for c in chunk.cells]


@pytest.mark.real_model
@pytest.mark.parametrize("heads", [[None], list(range(4))])
@pytest.mark.parametrize("batch_size", [None, 1, 5])
@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_every_run_planned_once_within_its_chunk(heads, batch_size, reuse_prefix) -> None:
    model = get_real("smollm2-135m-instruct")
    n, positions = model.cfg.n_layers, [0, 3, 4, 9, 17, 30]
    chunks = plan(model, 32, positions, heads, batch_size=batch_size, reuse_prefix=reuse_prefix)
    cells = _cells(chunks)
    assert sorted(cells, key=str) == sorted(
        [(layer, j, h) for layer in range(n) for j in range(len(positions)) for h in heads],
        key=str,
    )
    for chunk in chunks:
        assert all(c.layer >= chunk.start_layer and c.pos >= chunk.start_pos for c in chunk.cells)
        assert batch_size is None or len(chunk.cells) <= batch_size
        if not reuse_prefix:  # TransformerLens's loop: one layer, every position
            assert chunk.start_pos == 0 and {c.layer for c in chunk.cells} == {chunk.start_layer}


@pytest.mark.real_model
def test_the_plan_saves_work_on_a_real_model() -> None:
    """SmolLM2 at 32 tokens: later forwards start later, several layers share a forward."""
    model = get_real("smollm2-135m-instruct")
    chunks = plan(model, 32, list(range(32)), [None], batch_size=None, reuse_prefix=True)
    assert len({c.start_pos for c in chunks}) > 1
    assert any(len({c.layer for c in chunk.cells}) > 1 for chunk in chunks)
    work = sum((30 - c.start_layer) * len(c.cells) * (32 - c.start_pos) for c in chunks)
    whole = sum((30 - layer) * 32 * 32 for layer in range(30))
    assert work < 0.7 * whole


def _transformer_lens(model, hook, clean, corrupted, positions):
    """TransformerLens's sweep over every layer (and head) at ``positions`` only, shaped like
    residkit's values."""
    _, cache = model.run_with_cache(clean)
    kind = TL[hook].keywords
    axes = kind["index_axis_names"]
    n, heads = model.cfg.n_layers, model.cfg.n_heads
    cells = [
        (layer, p, *([h] if "head" in axes else []))
        for layer in range(n)
        for p in positions
        for h in (range(heads) if "head" in axes else [None])
    ]
    flat = tl_patching.generic_activation_patch(
        model,
        corrupted,
        cache,
        _metric,
        kind["patch_setter"],
        kind["activation_name"],
        index_df=pd.DataFrame(cells, columns=list(axes)),
    ).cpu()
    return flat.reshape(n, len(positions), *([heads] if "head" in axes else []))


@pytest.mark.parametrize(
    ("family", "hook"),
    [
        *((family, "resid_pre") for family in ("gemma3", "mistral-swa", "gpt2", "olmo2")),
        ("gemma3", "attn_out"),
        ("mistral-swa", "z"),
    ],
)
def test_reused_prefix_agrees_with_transformer_lens(family, hook, model_for) -> None:
    """Across the sliding window (gemma3, mistral-swa), absolute positions (gpt2), a norm
    after attention (olmo2): within the batching tolerance, one run per forward or batched;
    with reuse_prefix=False and one run per forward, bitwise."""
    model = model_for(family)
    clean = model.to_tokens(LONG)
    corrupted = model.to_tokens(OTHER)[:, : clean.shape[1]]
    positions = [1, 6, 9, 12, clean.shape[1] - 1]  # both sides of the 8-token window
    ref = _transformer_lens(model, hook, clean, corrupted, positions)
    scale = ref.abs().max().item()
    assert scale > 0

    def sweep(**kwargs):
        return patching_sweep(
            model,
            clean,
            corrupted,
            _metric,
            hook=hook,
            positions=positions,
            progress=False,
            **kwargs,
        )

    one, batched = sweep(batch_size=1), sweep()
    for ours in (one, batched):
        assert (ours.values - ref).abs().max().item() <= TOLERANCE * scale
    whole = sweep(batch_size=1, reuse_prefix=False)
    assert torch.equal(whole.values, ref)
    # One run per forward: each starts at its own layer and position, and does no more.
    n, t = model.cfg.n_layers, clean.shape[1]
    heads = model.cfg.n_heads if hook == "z" else 1
    exact = heads * sum((n - layer) * (t - p) for layer in range(n) for p in positions)
    assert (
        one.block_positions
        == exact
        < whole.block_positions
        == heads * n * (n + 1) // 2 * t * len(positions)
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_logits_before_the_patch_are_the_corrupted_runs(hook, model_for) -> None:
    """A metric reading position 4: every run patching a later position sees the corrupted
    run's logit there, bit for bit; runs patching position 4 or earlier do not (the control)."""
    model = model_for("llama")
    clean, corrupted = model.to_tokens(LONG), model.to_tokens(OTHER)
    corrupted = corrupted[:, : clean.shape[1]]
    at = 4
    corrupt_value = model(corrupted)[0, at, 100]
    sweep = patching_sweep(
        model, clean, corrupted, lambda logits: logits[0, at, 100], hook=hook, progress=False
    )
    assert (sweep.values[:, at + 1 :] == corrupt_value).all()
    assert not (sweep.values[:, : at + 1] == corrupt_value).all()


def test_transformer_lens_sees_the_same_prefix_logits(model_for) -> None:
    """TransformerLens's own runs agree with that reading: positions before the patch are the
    corrupted run's there too, so the corrupted logits handed to the metric are its values."""
    model = model_for("llama")
    clean, corrupted = model.to_tokens(LONG), model.to_tokens(OTHER)
    corrupted = corrupted[:, : clean.shape[1]]
    _, cache = model.run_with_cache(clean)
    at = 4
    ref = tl_patching.get_act_patch_resid_pre(
        model, corrupted, cache, lambda logits: logits[0, at, 100]
    ).cpu()
    assert (ref[:, at + 1 :] == model(corrupted)[0, at, 100]).all()


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neox", "olmo2"])
@pytest.mark.parametrize("hook", ["resid_pre", "z"])
def test_mlps_run_only_where_the_logits_depend_on_them(family, hook, model_for, monkeypatch):
    """Batched forwards run each block's MLP only from each run's patch on (and at the last
    block only where the metric reads): same values as TransformerLens within the batching
    tolerance, on a post-MLP norm (gemma3, olmo2) and parallel attention and MLP (gpt_neox).
    Control: an MLP that also skips the positions of the runs patched at its own block is
    caught."""
    model = model_for(family)
    clean = model.to_tokens(LONG)
    corrupted = model.to_tokens(OTHER)[:, : clean.shape[1]]
    positions = [1, 6, 9, clean.shape[1] - 1]
    ref = _transformer_lens(model, hook, clean, corrupted, positions)
    scale = ref.abs().max().item()

    def sweep():
        return patching_sweep(
            model, clean, corrupted, _metric, hook=hook, positions=positions,
            metric_positions=[-1], progress=False,
        )  # fmt: skip

    ours = sweep()
    assert (ours.values - ref).abs().max().item() <= TOLERANCE * scale
    n, t = model.cfg.n_layers, clean.shape[1]
    heads = model.cfg.n_heads if hook == "z" else 1
    needed = heads * sum((n - 1 - layer) * (t - p) + 1 for layer in range(n) for p in positions)
    assert ours.mlp_positions == needed < ours.block_positions

    real = chunks_module._needed_positions

    def too_few(cells, after_patch, low, n, head, device):
        out = real(cells, after_patch, low, n, head, device)
        rows, span = after_patch.shape
        mine = {  # each block's own runs dropped, as if patched a block higher
            r * span + q
            for r, c in enumerate(cells)
            if c.layer == low and low < n - 1
            for q in range(span)
        }
        if low in out or mine:
            everywhere = torch.arange(rows * span)
            kept = out.get(low, everywhere)
            out[low] = torch.tensor([i for i in kept.tolist() if i not in mine], dtype=torch.long)
        return out

    monkeypatch.setattr(chunks_module, "_needed_positions", too_few)
    assert (sweep().values - ref).abs().max().item() > TOLERANCE * scale
