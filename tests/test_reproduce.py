"""``residkit reproduce --quick`` on both real models: the structure of the result and its
exactness verdicts (KL == 0.0, bitwise logits, token identity). The free numbers (baseline
token match, ranks, latency) are what the report exists to show, so they are not asserted."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from residkit.cli import main
from residkit.reproduction import CLAIMS, Reproduction, reproduce
from residkit.reproduction.base import ClaimResult, Row, Sizes, load_cached, save_cached
from tests.conftest import REAL, get_real

pytestmark = pytest.mark.real_model

VERDICTS = {"reproduced", "differs", "not applicable"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Reproduction, Path, Path]:
    folder = tmp_path_factory.mktemp("reproduce")
    report = folder / "report.html"
    result = reproduce(
        list(REAL),
        quick=True,
        cache=folder / "cache",
        report_path=report,
        progress=False,
        load=get_real,
    )
    return result, report, folder / "cache"


def test_every_claim_has_rows_for_every_model_with_a_reason_where_it_differs(run) -> None:
    result, _, _ = run
    table = result.table
    assert list(table.columns) == [
        "claim",
        "model",
        "quantity",
        "paper",
        "residkit",
        "verdict",
        "why",
        "rule",
        "source",
    ]
    assert set(table["claim"]) == set(CLAIMS)
    for claim in CLAIMS:
        models = set(table.loc[table["claim"] == claim, "model"])
        assert set(REAL) <= models, (claim, models)
    assert set(table["verdict"]) <= VERDICTS
    unexplained = table[(table["verdict"] != "reproduced") & (table["why"].str.len() < 20)]
    assert unexplained.empty, unexplained
    assert (table["paper"].str.len() > 0).all() and (table["residkit"].str.len() > 0).all()
    judged = table[table["verdict"] != "not applicable"]
    assert (judged["rule"].str.len() > 10).all() and (judged["source"].str.len() > 5).all()
    differs = table[table["verdict"] == "differs"]["why"]
    assert differs.str.match(r"(measured: |hypothesis \(untested\): )").all(), differs


def test_figure_4_has_every_kl_reading_sampled_runs_and_pinned_prompts(run) -> None:
    from residkit.reproduction.prompts import texts

    result, _, _ = run
    baselines = result.result("baselines")
    quantities = " ".join(baselines.table["quantity"])
    for reading in ("teacher-forced", "along the policy's text", "each on its own text"):
        assert reading in quantities
    assert "sampled, seed" in quantities and "which KL reading" in quantities
    pinned = {t.name: t.sha256 for t in texts()}
    for name in REAL:
        prompts = baselines.frame(f"{name} prompts")
        assert len(prompts) == Sizes.quick_sizes().prompts
        assert all(pinned[r.text] == r.sha256 for r in prompts.itertuples())
        greedy = baselines.frame(name)
        assert greedy["own_mean_kl"].notna().all() and greedy["token_match_ci"].notna().all()
        assert baselines.frame(f"{name} sampled")["token_match"].notna().all()
    # Each rule is applied as stated: a range row is reproduced iff every cell is inside it.
    rows = baselines.table[baselines.table["quantity"].str.contains("mean KL")]
    for row in rows.itertuples():
        inside, total = re.search(r"(\d+) of (\d+) cells inside", row.residkit).groups()
        assert (row.verdict == "reproduced") == (inside == total)


def test_markov_rows_state_the_construction_and_controls(run) -> None:
    result, _, _ = run
    markov = result.result("markov")
    for row in markov.rows:
        assert "by construction" in row.quantity and "wrong layer" in row.residkit
    for name in REAL:
        ctl = markov.frame(f"{name} controls").iloc[0]
        assert ctl["partial_kl"] > 0 and ctl["wrong_layer_kl"] > 0


def test_ranks_test_both_readings_of_the_caption(run) -> None:
    result, _, _ = run
    table = result.result("ranks").table
    for name in REAL:
        mine = table[table["model"] == name]["quantity"]
        assert mine.str.contains("reading 'exists'").sum() == 2
        assert mine.str.contains("reading 'all'").sum() == 2


def test_cross_task_patching_is_bitwise_with_kl_exactly_zero(run) -> None:
    result, _, _ = run
    markov = next(r for r in result.results if r.claim == "markov")
    for name in REAL:
        runs = markov.frame(name)
        n_layers = get_real(name).cfg.n_layers
        assert set(runs["layer"]) == set(range(n_layers + 1))
        assert (runs["kl"] == 0.0).all() and runs["bitwise_equal"].all()
        # Negative control inside the same runs: the unpatched target differs from the source.
        assert (runs["control_kl"] > 1.0).all()
    assert (result.table.query("claim == 'markov'")["verdict"] == "reproduced").all()


def test_no_cache_decoding_is_token_identical(run) -> None:
    result, _, _ = run
    rows = result.table.query("claim == 'nocache'")
    assert (rows["verdict"] == "reproduced").all()
    assert rows["residkit"].str.startswith(f"{Sizes.quick_sizes().nocache_tokens}/").all()


def test_kvdirect_matches_the_full_cache_at_every_budget_with_kl_zero(run) -> None:
    result, _, _ = run
    baselines = next(r for r in result.results if r.claim == "baselines")
    for name in REAL:
        table = baselines.frame(name)
        kvd = table[table["policy"] == "kvdirect"]
        assert sorted(kvd["budget"]) == sorted(Sizes.quick_sizes().budgets)
        assert (kvd["token_match"] == 100.0).all()
        assert (kvd["max_kl"] == 0.0).all() and (kvd["free_max_kl"] == 0.0).all()
        # Negative control: the plain window at the smallest budget loses something.
        window = table[(table["policy"] == "window") & (table["budget"] == min(kvd["budget"]))]
        assert float(window["mean_kl"].iloc[0]) > 0.0


def test_chat_replies_agree_and_memory_is_measured_from_the_tensors(run) -> None:
    result, _, _ = run
    chat = next(r for r in result.results if r.claim == "chat")
    turns = chat.frame("smollm2-135m-instruct")
    assert set(turns["policy"]) == {
        "full cache",
        "KV-Direct layer checkpoints (B=16)",
        "KV-Direct token checkpoints (B=16)",
    }
    assert (turns["total_bytes"] > 0).all()
    layer = turns[turns["policy"].str.contains("layer")]
    assert (layer["checkpoint_bytes"] > 0).all()
    first = chat.table.iloc[0]
    assert first["quantity"].startswith("replies") and first["verdict"] == "reproduced"
    memory = chat.table[chat.table["quantity"].str.startswith("memory")]
    assert len(memory) == 2 and memory["residkit"].str.contains("peak .* between forwards").all()


def test_anatomy_formula_matches_the_tensors(run) -> None:
    result, _, _ = run
    rows = result.table.query("claim == 'anatomy' and quantity.str.contains('measured')")
    assert set(rows["model"]) == set(REAL)
    assert (rows["verdict"] == "reproduced").all()


def test_report_is_self_contained_with_every_figure(run) -> None:
    result, report, _ = run
    html = report.read_text()
    n_figures = sum(len(r.figures) for r in result.results)
    assert n_figures >= len(CLAIMS) * len(REAL) - 1  # anatomy draws one figure for all models
    assert html.count('class="plotly-graph-div"') == n_figures
    # Nothing fetched from anywhere: no script or stylesheet with a source outside the file.
    assert not re.findall(r"<(?:script|link|img)[^>]+(?:src|href)=", html)
    assert html.count("<script") - html.count("Plotly.newPlot") <= 2  # plotly.js once
    for claim in CLAIMS:
        assert f"{claim}. The paper: " in html


def test_a_second_run_resumes_from_the_cache(run) -> None:
    result, _, cache = run

    def refuse(name: str):
        raise AssertionError(f"{name} should not be loaded: every claim is cached")

    again = reproduce(list(REAL), quick=True, cache=cache, progress=False, load=refuse)
    pd.testing.assert_frame_equal(again.table, result.table)
    # Negative control: other sizes do not reuse the cache.
    assert load_cached(cache, "markov", "+".join(REAL), Sizes()) is None


def test_long_claims_resume_cell_by_cell(run, monkeypatch: pytest.MonkeyPatch) -> None:
    import residkit.comparison
    import residkit.reproduction.fractions

    result, _, cache = run
    key = "+".join(REAL)
    for claim in ("baselines", "fractions"):
        assert (cache / f"{claim}--{key}.cells.jsonl").stat().st_size > 0
        (cache / f"{claim}--{key}.json").unlink()  # as if the run stopped before the claim ended

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished cell was decoded again")

    monkeypatch.setattr(residkit.comparison, "generate", refuse)
    monkeypatch.setattr(residkit.reproduction.fractions, "generate", refuse)
    again = reproduce(list(REAL), claims=["baselines", "fractions"], quick=True, cache=cache,
                      progress=False, load=get_real)  # fmt: skip
    mine = result.table[result.table["claim"].isin(["baselines", "fractions"])]
    pd.testing.assert_frame_equal(again.table.reset_index(drop=True), mine.reset_index(drop=True))
    # Control: without the cells the claim decodes again, and meets the refusal.
    (cache / f"fractions--{key}.cells.jsonl").unlink()
    (cache / f"fractions--{key}.json").unlink()
    with pytest.raises(AssertionError, match="decoded again"):
        reproduce(list(REAL), claims=["fractions"], quick=True, cache=cache, progress=False,
                  load=get_real)  # fmt: skip


def test_claim_results_round_trip_and_refuse_other_formats(tmp_path: Path) -> None:
    row = Row("m", "q", "p", "r", "reproduced", rule="r", source="abstract")
    result = ClaimResult("markov", "t", [row], settings={"a": 1}, commit="abc")
    assert ClaimResult.from_json(result.to_json()) == result
    text = result.to_json().replace('"format": 2', '"format": 0')
    with pytest.raises(ValueError, match="another residkit version"):
        ClaimResult.from_json(text)
    save_cached(tmp_path, "m", result)
    assert load_cached(tmp_path, "markov", "m", Sizes()) is None  # settings differ


def test_a_differing_row_needs_a_reason_a_rule_and_a_source() -> None:
    with pytest.raises(ValueError, match="needs a reason"):
        Row("m", "q", "p", "r", "differs")
    with pytest.raises(ValueError, match="a measurement"):
        Row("m", "q", "p", "r", "differs", "model size", rule="r", source="abstract")
    with pytest.raises(ValueError, match="rule and source"):
        Row("m", "q", "p", "r", "differs", "measured: 3 of 5")
    Row("m", "q", "p", "r", "differs", "hypothesis (untested): size", rule="r", source="s")
    Row("m", "q", "p", "r", "not applicable", "no chat template")  # needs neither


def test_bad_claims_and_models_are_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"unknown claim\(s\) \['figure9'\]"):
        reproduce(list(REAL), claims=["figure9"], load=get_real)
    with pytest.raises(ValueError, match="non-empty list"):
        reproduce("smollm2-135m-instruct", load=get_real)
    assert main(["reproduce", "--claims", "figure9"]) == 2
    err = capsys.readouterr().err
    assert "figure9" in err and "markov" in err and len(err.splitlines()) == 1


def test_text_output_fits_a_terminal(run) -> None:
    result, _, _ = run
    text = result.text(width=100)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert text.count("| REPRODUCED") == (result.table["verdict"] == "reproduced").sum()


def test_markdown_page_has_every_claim_and_row(run, tmp_path: Path) -> None:
    from residkit.reproduction.markdown import write_markdown

    result, report, _ = run
    page = write_markdown(
        result, tmp_path / "r.md", command="residkit reproduce --quick", report_path=report,
        images=False,
    )  # fmt: skip
    text = page.read_text()
    assert "residkit reproduce --quick" in text
    for claim in CLAIMS:
        assert f"## {claim}. The paper: " in text
    assert text.count("| reproduced |") == (result.table["verdict"] == "reproduced").sum()
    assert "D_KL(source \\|\\| patched)" in text  # pipes escaped inside table cells
    assert "residkit commit" in text and ":mod:" not in text and ":class:" not in text


def test_a_claim_left_out_keeps_a_row_saying_why() -> None:
    result = reproduce(
        ["zoo:llama"], claims=["anatomy", "baselines"], quick=True, cache=None, progress=False,
        not_run={"baselines": "about 78 minutes on 2 cores"},
    )  # fmt: skip
    row = result.table[result.table["claim"] == "baselines"].iloc[0]
    assert row["residkit"] == "not run: about 78 minutes on 2 cores"
    assert row["verdict"] == "not applicable" and row["model"] == "zoo:llama"
    assert (result.table["claim"] == "anatomy").any()
    with pytest.raises(ValueError, match="unknown claim"):
        reproduce(["zoo:llama"], quick=True, cache=None, not_run={"lunch": "x"})
    with pytest.raises(ValueError, match=r"give only the reason, got .*Not run yet: slow"):
        reproduce(["zoo:llama"], quick=True, cache=None, not_run={"chat": "Not run yet: slow"})
