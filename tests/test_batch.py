"""Batches of prompts (residkit/generation/feed.py, the caches' mask and positions): left padding,
per-row positions, per-row eviction and checkpoints, per-row stop at EOS."""

import pytest
import torch

import residkit
from residkit.generation.feed import Feed
from residkit.policies import (
    H2O,
    TOVA,
    FullCache,
    KVDirect,
    NoCache,
    SnapKV,
    StreamingLLM,
    Window,
)
from residkit.policies.kvdirect_cache import KVDirectCache
from tests.conftest import REAL, get_model, get_real

# Lengths 21, 3, 13, 8 (BOS included): three rows padded, one by 18 tokens.
PROMPTS = ["abcdefghijklmnopqrst", "ab", "abcdefghijkl", "abcdefg"]
N_NEW = 10

EXACT = {
    "kvdirect-layer": KVDirect(4),
    "kvdirect-token": KVDirect(4, checkpoint="token"),
    "kvdirect-stride": KVDirect(4, checkpoint="stride", stride=2),
    "kvdirect-chunked": KVDirect(3, prefill_chunk=5),
}
BASELINES = {
    "window": Window(6),
    "streaming": StreamingLLM(6, n_sink=2),
    "h2o": H2O(6),
    "snapkv": SnapKV(6, window_size=2, kernel_size=1),
    "tova": TOVA(6),
}
EVERY = {"full": FullCache(), "none": NoCache(), **EXACT, **BASELINES}


def _batch(model, policy, **kw):
    kw = {"max_new_tokens": N_NEW, "return_logits": True, "stop_at_eos": False} | kw
    return residkit.generate(model, PROMPTS, policy=policy, **kw)


def _full_for(policy):
    return FullCache(prefill_chunk=getattr(policy, "prefill_chunk", None))


@pytest.mark.parametrize("family", ["gemma3", "qwen3", "gpt2"])
@pytest.mark.parametrize("name", list(EXACT))
def test_each_row_is_bitwise_the_full_cache_row(name: str, family: str, no_leaked_hooks) -> None:
    """KV-Direct in a padded batch: every row's logits at every step bitwise equal to the
    same row under FullCache in the same batch (K/V recomputed with each row's positions)."""
    model, policy = get_model(family), EXACT[name]
    with no_leaked_hooks(model):
        out = _batch(model, policy)
    ref = _batch(model, _full_for(policy))
    assert out.padding == [0, 18, 8, 13] and out.stats.tokens_evicted > 0
    for row, (a, b) in enumerate(zip(out, ref, strict=True)):
        assert a.logits is not None and b.logits is not None
        assert torch.equal(a.logits, b.logits), f"row {row}"


# Largest |logit| difference between a row of the batch and the same prompt alone, measured on
# the zoo (float32): 2.4e-05 (qwen3, eviction baselines). The batch runs other GEMM shapes (M =
# rows x tokens) and a padded row's attention other lengths, so the last bits differ; 1e-3 is
# forty times that and far below any change of mask or position (>= 0.1, see the controls).
ROW_VS_ALONE = 1e-3


@pytest.mark.parametrize("name", list(EVERY))
def test_each_row_decodes_as_its_prompt_alone(name: str) -> None:
    model, policy = get_model("qwen3"), EVERY[name]
    out = _batch(model, policy)
    for prompt, row in zip(PROMPTS, out, strict=True):
        alone = residkit.generate(
            model, prompt, policy=policy, max_new_tokens=N_NEW, return_logits=True,
            stop_at_eos=False,
        )  # fmt: skip
        assert torch.equal(row.tokens, alone.tokens), prompt
        assert row.logits is not None and alone.logits is not None
        assert (row.logits - alone.logits).abs().max().item() < ROW_VS_ALONE


@pytest.mark.parametrize("name", list(BASELINES))
def test_eviction_keeps_each_rows_own_tokens(name: str) -> None:
    """A padded row keeps the positions its prompt alone keeps; padding only where the row
    has fewer real tokens than the budget, and then only the padding just before them."""
    model, policy = get_model("llama"), BASELINES[name]
    feed = Feed.of(model, PROMPTS)
    held = {}
    with policy.make_cache(model) as cache:
        residkit.generation.engine.prefill(model, cache, feed.ids, None, feed)
        held = cache.held_positions()
    for row, prompt in enumerate(PROMPTS):
        with policy.make_cache(model) as alone:
            residkit.generation.engine.prefill(model, alone, model.to_tokens(prompt), None)
            own = alone.held_positions()
        for layer, positions in held.items():
            kept = positions[row]
            real = kept[kept >= 0].view(kept.shape[0], -1)
            assert torch.equal(real, own[layer][0]), (row, layer)
            pads = kept[kept < 0]
            assert pads.numel() == 0 or pads.max() == -1, "padding kept is the padding nearest"


def test_transformers_generate_on_a_padded_batch(no_leaked_hooks) -> None:
    """transformers' generate with the padded ids and mask: every policy's cache gives the
    same tokens and bitwise the same logits per row and step as residkit.generate."""
    model = get_model("gemma3")
    feed = Feed.of(model, PROMPTS)
    width = feed.ids.shape[1]
    for name, policy in EVERY.items():
        if getattr(policy, "prefill_chunk", None):
            continue  # transformers' generate prefills in one forward
        ref = _batch(model, policy)
        with no_leaked_hooks(model), torch.no_grad(), policy.make_cache(model) as cache:
            out = model.original_model.generate(
                feed.ids, attention_mask=feed.mask, past_key_values=cache,
                max_new_tokens=N_NEW, do_sample=False, output_logits=True,
                return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        for row in range(len(PROMPTS)):
            assert torch.equal(out.sequences[row, width:], ref[row].tokens), (name, row)
            for step, logits in enumerate(out.logits):
                assert torch.equal(logits[row], ref[row].logits[step]), (name, row, step)


def test_a_wrong_position_offset_or_mask_is_caught(monkeypatch) -> None:
    """Negative controls: KV-Direct recomputing one row at positions shifted by one, or with one
    more token masked, differs from the full cache in that row only."""
    model = get_model("qwen3")
    ref = _batch(model, FullCache())
    positions = KVDirectCache._positions

    def shifted(self, start, ids, given):
        out = positions(self, start, ids, given).expand(ids.shape[0], -1).clone()
        out[1] += 1
        return out

    monkeypatch.setattr(KVDirectCache, "_positions", shifted)
    wrong = _batch(model, KVDirect(4))
    monkeypatch.undo()
    assert torch.equal(wrong[0].logits, ref[0].logits)
    assert (wrong[1].logits - ref[1].logits).abs().max() > 0.1

    piece = KVDirectCache._piece

    def masked(self, start, ids, given, rows):
        out = piece(self, start, ids, given, rows)
        if out.mask is not None:
            out.mask = out.mask.clone()
            out.mask[2, 8] = False  # row 2's first real token (its BOS)
        return out

    monkeypatch.setattr(KVDirectCache, "_piece", masked)
    wrong = _batch(model, KVDirect(4, checkpoint="token"))
    assert torch.equal(wrong[0].logits, ref[0].logits)
    assert (wrong[2].logits - ref[2].logits).abs().max() > 0.1


def test_rows_stop_at_their_own_eos(monkeypatch) -> None:
    """A row that chooses EOS stops there and is fed padding; the others go on unchanged; the
    same as transformers' generate with that EOS."""
    model = get_model("llama")
    free = _batch(model, KVDirect(4))
    eos = int(free[1].tokens[2])
    monkeypatch.setattr(residkit.generation.engine, "eos_ids", lambda model: {eos})
    out = _batch(model, KVDirect(4), stop_at_eos=True)
    assert len(out[1].tokens) == 3 and int(out[1].tokens[-1]) == eos
    for a, b in zip(out, free, strict=True):
        n = len(a.tokens)
        assert torch.equal(a.tokens, b.tokens[:n]) and torch.equal(a.logits, b.logits[:n])
    feed = Feed.of(model, PROMPTS)
    with torch.no_grad(), KVDirect(4).make_cache(model) as cache:
        seq = model.original_model.generate(
            feed.ids, attention_mask=feed.mask, past_key_values=cache, max_new_tokens=N_NEW,
            do_sample=False, eos_token_id=eos, pad_token_id=0,
        )  # fmt: skip
    for row, gen in enumerate(out):
        got = seq[row, feed.ids.shape[1] :][: len(gen.tokens)]
        assert torch.equal(got, gen.tokens)


def test_memory_per_row_and_in_total() -> None:
    model = get_model("llama")
    out = _batch(model, KVDirect(4))
    one = residkit.generate(model, PROMPTS[0], policy=KVDirect(4), max_new_tokens=N_NEW)
    stats = out.stats
    assert stats.batch_size == len(PROMPTS) and one.stats.batch_size == 1
    per_row = stats.per_row()
    assert per_row["peak_total_bytes"] * len(PROMPTS) == stats.peak_total_bytes
    # Every row holds the longest prompt's positions (padding included), as row 0 alone does,
    # plus each fed token's position id (int64), which a padded batch needs to recompute.
    fed = len(out[0].prompt_tokens) + N_NEW - 1
    assert per_row["checkpoint_bytes"] == one.stats.checkpoint_bytes + 8 * fed
    table = out.table
    assert list(table["padding"]) == [0, 18, 8, 13] and len(out.figure().data) == 3


def test_sampled_batch_matches_transformers_generate() -> None:
    model = get_model("llama")
    feed = Feed.of(model, PROMPTS)
    torch.manual_seed(7)
    ours = residkit.generate(
        model, PROMPTS, policy=H2O(6), max_new_tokens=N_NEW, do_sample=True, top_k=20,
        stop_at_eos=False, seed=None,
    )  # fmt: skip
    torch.manual_seed(7)
    with torch.no_grad(), H2O(6).make_cache(model) as cache:
        seq = model.original_model.generate(
            feed.ids, attention_mask=feed.mask, past_key_values=cache, max_new_tokens=N_NEW,
            do_sample=True, top_k=20, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    for row, gen in enumerate(ours):
        assert torch.equal(seq[row, feed.ids.shape[1] :], gen.tokens)


def test_bad_masks_are_refused(no_leaked_hooks) -> None:
    model = get_model("llama")
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    gap = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]])
    with no_leaked_hooks(model):
        with pytest.raises(ValueError, match="row 1 masks a token after a real one"):
            residkit.generate(model, ids, attention_mask=gap, max_new_tokens=2)
        with pytest.raises(ValueError, match=r"attention_mask \[batch, past \+ new\]"):
            residkit.generate(model, ids, attention_mask=gap[:, :3], max_new_tokens=2)
        with torch.no_grad(), KVDirect(4).make_cache(model) as cache:
            model(ids, past_key_values=cache)
            late = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
            with pytest.raises(ValueError, match="changed a token already in the cache"):
                model(ids[:, :1], past_key_values=cache, attention_mask=late)
    with pytest.raises(ValueError, match="strings are padded here"):
        residkit.generate(model, PROMPTS, attention_mask=gap, max_new_tokens=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_batches_stay_bitwise(dtype: torch.dtype) -> None:
    model = residkit.load("zoo:gemma3", dtype=dtype)
    ref = _batch(model, FullCache())
    for policy in EXACT.values():
        out, full = _batch(model, policy), _batch(model, _full_for(policy))
        assert out[0].logits is not None and out[0].logits.dtype == dtype
        assert all(torch.equal(a.logits, b.logits) for a, b in zip(out, full, strict=True))
    assert ref.stats.batch_size == len(PROMPTS)


REAL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a village at the edge of a great forest, there lived",
    "2 + 2 =",
    "The mitochondria is the powerhouse of the cell, which means that",
    "Translate to French: good morning",
    "A haiku about the sea:",
    "Water boils at a temperature of",
]


@pytest.mark.real_model
@pytest.mark.parametrize("name", REAL)
def test_real_batches_decode_as_each_prompt_alone(name: str, capsys) -> None:
    """Eight prompts of different lengths at once: each row's greedy tokens are its prompt's
    alone (FullCache and KV-Direct); KV-Direct's rows bitwise the full cache's in the batch."""
    model = get_real(name)
    kw = {"max_new_tokens": 16, "return_logits": True, "stop_at_eos": False}
    full = residkit.generate(model, REAL_PROMPTS, **kw)
    ours = residkit.generate(model, REAL_PROMPTS, policy=KVDirect(8), **kw)
    assert len(set(full.padding)) >= 4 and ours.stats.tokens_evicted > 0
    worst = 0.0
    for prompt, row, kv in zip(REAL_PROMPTS, full, ours, strict=True):
        assert torch.equal(kv.logits, row.logits)
        alone = residkit.generate(model, prompt, **kw)
        assert torch.equal(row.tokens, alone.tokens), prompt
        worst = max(worst, (row.logits - alone.logits).abs().max().item())
    with capsys.disabled():
        print(f"\n{name}: largest |logit| difference, batch row vs prompt alone: {worst:.3g}")
    assert worst > 0.0  # other GEMM shapes: measured, not assumed equal


def test_compare_policies_in_batches_agrees_with_one_at_a_time() -> None:
    from residkit.comparison import compare_policies

    model = get_model("llama")
    kw = {"budgets": [4, 8], "max_new_tokens": 8, "kl": "both", "progress": False}
    alone = compare_policies(model, PROMPTS, **kw).table
    together = compare_policies(model, PROMPTS, batch_size=3, **kw).table
    assert list(alone["token_match"]) == list(together["token_match"])
    for column in ("mean_kl", "free_mean_kl"):  # KL of logits equal up to ROW_VS_ALONE
        assert (alone[column] - together[column]).abs().max() < 1e-4
    with pytest.raises(ValueError, match=r"token id lengths \[2, 3\]"):
        compare_policies(model, [torch.tensor([1, 2, 3]), torch.tensor([4, 5])], batch_size=2, **kw)
    # Token ids of one length go in stacked, as the strings' rows would.
    shortest = min(model.to_tokens(p).shape[1] for p in PROMPTS)
    ids = [model.to_tokens(p)[:, :shortest] for p in PROMPTS]
    stacked = compare_policies(model, ids, batch_size=3, **kw).table
    single = compare_policies(model, ids, **kw).table
    assert list(stacked["token_match"]) == list(single["token_match"])


def test_bad_batch_inputs_are_refused_by_name(no_leaked_hooks) -> None:
    from residkit.comparison import compare_policies

    model = get_model("llama")
    with no_leaked_hooks(model):
        with pytest.raises(ValueError, match="empty list of prompts"):
            residkit.generate(model, [], max_new_tokens=2)
        with pytest.raises(ValueError, match=r"forced_tokens has shape \(3, 4\)"):
            residkit.generate(
                model, PROMPTS, max_new_tokens=4, forced_tokens=torch.ones(3, 4, dtype=torch.long)
            )
        with pytest.raises(ValueError, match="batch_size"):
            compare_policies(model, PROMPTS, budgets=[4], batch_size=0, progress=False)
