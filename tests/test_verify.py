"""residkit verify: every section on a zoo model, its rows, its figures, its errors."""

import pytest

import residkit
from residkit.checks import SECTIONS, VerifyContext, verify
from residkit.checks import baselines as baselines_section
from residkit.checks import spectra as spectra_section


def test_every_section_passes_and_leaves_no_hooks(model_for, no_leaked_hooks, tmp_path) -> None:
    model = model_for("gemma3")
    with no_leaked_hooks(model):
        report = verify(model, name="zoo:gemma3", out_dir=tmp_path)
    table = report.table
    assert report.passed, table.to_string()
    assert list(dict.fromkeys(table["section"])) == list(SECTIONS)
    assert set(table["passed"]) == {True, None}
    figures = [f for f in table["figure"] if f]
    assert figures and all(tmp_path.joinpath(f).exists() for f in figures)
    assert (tmp_path / "plotly.min.js").exists()  # beside the figures, never from a CDN
    assert "cdn.plot.ly" not in (tmp_path / "markov.html").read_text()
    assert len(report.figure().data) == 1


def test_a_failing_claim_fails_the_report(model_for, monkeypatch) -> None:
    """Negative control: a section whose claim fails makes the report fail."""
    from residkit.checks import base

    report = base.VerifyReport(model="m", checks=[base.Check("x", "claim", "no", False)])
    assert not report.passed
    report.checks[0].passed = None
    assert report.passed


def test_spectra_section(model_for, tmp_path) -> None:
    rows = spectra_section.run(model_for("phi3"), VerifyContext(out_dir=tmp_path))
    assert [r.passed for r in rows] == [True, True, None]
    assert rows[-1].figure is not None and (tmp_path / "qk_rank_heatmap.html").exists()


def test_baselines_section(model_for, tmp_path) -> None:
    checks = baselines_section.run(
        model_for("llama"), VerifyContext(out_dir=tmp_path, figures=False)
    )
    claims = {c.check: c.passed for c in checks if c.passed is not None}
    assert claims == {
        "kvdirect budget=4 vs full cache (12 tokens)": True,
        "no hooks left on the model": True,
    }
    assert len(checks) == 6 + 1


def test_unknown_section(model_for) -> None:
    with pytest.raises(ValueError, match=r"unknown verify section\(s\) \['nope'\]"):
        verify(model_for("llama"), sections=["nope"])
    assert residkit.verify is verify
