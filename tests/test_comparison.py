"""The three KL readings of :mod:`residkit.comparison.readings`, intervals and sampled runs."""

import pytest
import scipy.stats
import torch

from residkit.comparison import compare_policies
from residkit.comparison.readings import column, readings_of
from residkit.generation import generate
from residkit.metrics import kl_divergence, mean_interval
from residkit.policies.window import Window
from tests.conftest import get_model

PROMPT = "the cat sat on the mat and the dog sat on the log, then"
KW = {"max_new_tokens": 8, "return_logits": True, "stop_at_eos": False}


def _window_cmp(**kw):
    model = get_model("llama")
    return model, compare_policies(
        model, PROMPT, budgets=[3], policies=["window", "kvdirect"], max_new_tokens=8,
        kl="all", progress=False, **kw,
    )  # fmt: skip


def test_each_reading_is_its_definition_by_hand() -> None:
    model, cmp = _window_cmp()
    full = generate(model, PROMPT, **KW)
    pol = generate(model, PROMPT, policy=Window(3), **KW)
    assert not torch.equal(pol.tokens, full.tokens)  # the texts part: the readings can differ
    forced = generate(model, PROMPT, policy=Window(3), forced_tokens=full.tokens, **KW)
    along = generate(model, PROMPT, forced_tokens=pol.tokens, **KW)
    by_hand = {
        "teacher": kl_divergence(full.logits, forced.logits),
        "free": kl_divergence(along.logits, pol.logits),
        "own": kl_divergence(full.logits, pol.logits),
    }
    steps = cmp.steps[cmp.steps["policy"] == "window"]
    for reading, name in (("teacher", "kl"), ("free", "free_kl"), ("own", "own_kl")):
        assert steps[name].tolist() == by_hand[reading].tolist()  # the same float64 values
    # Control: the readings are not one number under three names.
    assert by_hand["own"].tolist() != by_hand["teacher"].tolist()
    row = cmp.table[cmp.table["policy"] == "window"].iloc[0]
    # pandas' mean and torch's float64 mean sum in different orders: equal to 1e-12 relative.
    assert row[column("own")] == pytest.approx(by_hand["own"].mean().item(), rel=1e-12)


def test_readings_agree_until_the_texts_part_and_are_zero_for_kvdirect() -> None:
    _, cmp = _window_cmp()
    steps = cmp.steps[cmp.steps["policy"] == "window"].reset_index()
    first = int(steps.index[~steps["match"]][0])
    before = steps.iloc[: first + 1]  # step `first` is predicted from the same text
    assert (before["kl"] == before["own_kl"]).all() and (before["free_kl"] == before["kl"]).all()
    after = steps.iloc[first + 1 :]
    assert (after["own_kl"] != after["kl"]).any()  # control: after it, they part
    kvd = cmp.table[cmp.table["policy"] == "kvdirect"].iloc[0]
    assert [kvd[column(r)] for r in ("teacher", "free", "own")] == [0.0, 0.0, 0.0]
    assert kvd["token_match"] == 100.0


def test_memory_columns() -> None:
    _, cmp = _window_cmp()
    t = cmp.table.set_index("policy")
    for policy in ("window", "kvdirect"):
        assert t.loc[policy, "peak_total_bytes"] >= t.loc[policy, "peak_active_kv_bytes"] > 0
        assert t.loc[policy, "held_bytes"] > 0
    assert (
        t.loc["kvdirect", "peak_checkpoint_bytes"] > 0 == t.loc["window", "peak_checkpoint_bytes"]
    )


def test_sampled_runs_share_a_seed() -> None:
    _, sampled = _window_cmp(seed=5)
    _, greedy = _window_cmp()
    kvd = sampled.table[sampled.table["policy"] == "kvdirect"].iloc[0]
    assert kvd["token_match"] == 100.0 and kvd["own_mean_kl"] == 0.0  # exact: same draws
    # Control: sampling changed what the window policy decoded.
    assert not sampled.steps["match"].equals(greedy.steps["match"]) or not (
        sampled.steps["own_kl"].equals(greedy.steps["own_kl"])
    )


def test_interval_matches_student_t() -> None:
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    mean, half = mean_interval(values)
    lo, hi = scipy.stats.t.interval(0.95, len(values) - 1, loc=mean, scale=scipy.stats.sem(values))
    assert half == pytest.approx((hi - lo) / 2, rel=1e-3)  # the table's 3 decimals
    assert mean_interval([2.0])[1] != mean_interval([2.0])[1]  # NaN: no spread from one value


def test_unknown_reading_is_named() -> None:
    with pytest.raises(ValueError, match="'forced'"):
        readings_of("forced")
    with pytest.raises(ValueError, match="empty"):
        readings_of([])
    model = get_model("llama")
    with pytest.raises(ValueError, match="'bogus'"):
        compare_policies(model, PROMPT, budgets=[3], kl="bogus", progress=False)


def test_shipped_texts_refuse_unknown_names_and_changed_bytes(tmp_path, monkeypatch) -> None:
    import shutil

    from residkit.reproduction import prompts

    with pytest.raises(ValueError, match="no shipped text 'lorem'"):
        prompts.text("lorem")
    copy = tmp_path / "texts"
    shutil.copytree(prompts.TEXT_DIR, copy)
    monkeypatch.setattr(prompts, "TEXT_DIR", copy)
    assert prompts.text("code-difflib").startswith('"""')  # control: the copy reads
    path = copy / "code-difflib.txt"
    path.write_bytes(path.read_bytes().replace(b"difflib", b"diffl1b", 1))
    with pytest.raises(ValueError, match="not the pinned"):
        prompts.text("code-difflib")
    model = get_model("llama")
    with pytest.raises(ValueError, match="n=0: residkit ships 20 texts"):
        prompts.prompt_set(model, 0)


def test_bad_prefill_chunks_and_empty_intervals_are_named() -> None:
    with pytest.raises((TypeError, ValueError), match="prefill_chunk"):
        Window(4, prefill_chunk=0)
    with pytest.raises(ValueError, match="at least one value"):
        mean_interval([])


def test_resume_reads_finished_cells_back_and_only_those(tmp_path, monkeypatch) -> None:
    import residkit.comparison as comparison

    model = get_model("llama")
    calls = []
    real = comparison.generate
    monkeypatch.setattr(comparison, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = {"budgets": [3, 5], "policies": ["window", "kvdirect"], "kl": "all", "progress": False}
    path = tmp_path / "cells.jsonl"
    first = compare_policies(model, PROMPT, max_new_tokens=6, resume=path, **kw)
    n_first = len(calls)
    assert n_first > 0 and len(path.read_text().splitlines()) == 4
    again = compare_policies(model, PROMPT, max_new_tokens=6, resume=path, **kw)
    assert len(calls) == n_first  # nothing decoded: every cell came from the file
    assert again.table.equals(first.table) and again.steps.equals(first.steps)
    # A cell cut short by a killed process is run again; the others are read back.
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    third = compare_policies(model, PROMPT, max_new_tokens=6, resume=path, **kw)
    assert n_first < len(calls) < 2 * n_first and third.table.equals(first.table)
    # Control: another argument is another key, so every cell runs again.
    before = len(calls)
    compare_policies(model, PROMPT, max_new_tokens=5, resume=path, **kw)
    assert len(calls) - before >= n_first - 1  # the reference and every cell again


def test_the_full_cache_row_is_the_reference_run() -> None:
    model = get_model("llama")
    cmp = compare_policies(model, PROMPT, budgets=[3], policies=["full"], max_new_tokens=6,
                           kl="all", progress=False)  # fmt: skip
    full = generate(model, PROMPT, max_new_tokens=6, return_logits=True, stop_at_eos=False)
    row = cmp.table.iloc[0]
    assert row["token_match"] == 100.0 and row["max_kl"] == 0.0
    assert row["peak_total_bytes"] == full.stats.peak_total_bytes
