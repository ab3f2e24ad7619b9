"""The command line: verify's JSON and exit codes; bad model names get one line and exit 2."""

import json
import os

from residkit import cli, zoo


def test_verify_json_on_a_zoo_folder(capsys, tmp_path) -> None:
    path = zoo.build("gemma3", size="tiny")
    args = ["verify", "--model", str(path), "--json", "--out", str(tmp_path)]
    code = cli.main([*args, "--section", "load", "--section", "markov"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0, payload
    assert payload["passed"] is True
    assert {c["section"] for c in payload["checks"]} == {"load", "markov"}
    assert any(c["figure"] for c in payload["checks"])


def test_verify_missing_model_exits_2(capsys) -> None:
    assert cli.main(["verify", "--model", "no-such-org/no-such-model"]) == 2
    assert "no-such-org/no-such-model" in capsys.readouterr().err


def test_a_bare_zoo_family_name_points_to_the_zoo_prefix(capsys) -> None:
    assert cli.main(["verify", "--model", "llama"]) == 2
    assert "--model zoo:llama" in capsys.readouterr().err


def test_verify_writes_nothing_unless_asked(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["verify", "--model", "zoo:llama", "--section", "capture"]) == 0
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    # The terminal table fits 100 columns and shows no NaN where a row has no figure.
    assert max(len(line) for line in out.splitlines()) <= 100
    assert "nan" not in out.lower() and "PASS  capture: captured residuals" in out


def test_verify_report_is_one_self_contained_file(capsys, tmp_path) -> None:
    report, figures = tmp_path / "r" / "report.html", tmp_path / "figs"
    args = ["verify", "--model", "zoo:llama", "--section", "capture", "--section", "markov"]
    assert cli.main([*args, "--report", str(report), "--out", str(figures)]) == 0
    out = capsys.readouterr().out
    assert f"report: {report}" in out and f"figures: {figures}" in out
    html = report.read_text()
    assert html.count('class="plotly-graph-div"') == 2 and 'src="http' not in html
    assert "transformer-lens" in html and "zoo:llama" in html
    assert sorted(p.name for p in figures.glob("*.html")) == ["markov.html", "residual_norms.html"]


def test_verify_report_to_an_unwritable_place_exits_2(capsys, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = ["verify", "--model", "zoo:llama", "--report", str(blocker / "r.html")]
    assert cli.main(args) == 2
    assert "cannot write the report" in capsys.readouterr().err


def test_threads_option_sets_torch_and_leaves_it_as_it_was(capsys) -> None:
    import torch

    from residkit.cli import main
    from residkit.threads import auto_threads, cores

    before = torch.get_num_threads()
    assert main(["--threads", "0", "models", "list"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err
    assert main(["--threads", "1", "models", "list"]) == 0
    assert torch.get_num_threads() == before
    assert auto_threads(load=0.0) == cores() and auto_threads(load=cores() + 5.0) == 1


def test_a_report_path_that_is_a_directory_fails_before_any_work(tmp_path, capsys) -> None:
    import time

    from residkit.cli import main

    start = time.perf_counter()
    assert main(["reproduce", "--quick", "--report", str(tmp_path)]) == 2
    assert main(["verify", "--model", "zoo:llama", "--report", str(tmp_path)]) == 2
    assert time.perf_counter() - start < 5  # refused before any model loads
    err = capsys.readouterr().err
    assert err.count("is a directory; give a file name") == 2


def test_a_misspelt_model_is_refused_before_torch_loads() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from residkit.cli import main; rc = main({argv!r}); "
        "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(argv: list[str]) -> str:
        done = subprocess.run([sys.executable, "-c", code.format(argv=argv)], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        return done.stdout.strip().splitlines()[-1]

    assert run(["verify", "--model", "no-such/model"]) == "2 False False"
    assert run(["reproduce", "--model", "zoo:llama", "--model", "nope"]) == "2 False False"
    # Control: a name that may load goes on to torch (here failing later, on its section).
    assert run(["verify", "--model", "zoo:llama", "--section", "bogus"]) == "2 True True"


def test_the_light_list_of_zoo_families_is_the_zoo_s() -> None:
    from residkit import zoo
    from residkit._names import ZOO_FAMILIES

    assert sorted(ZOO_FAMILIES) == sorted(set(zoo.ARCHITECTURES) | set(zoo.VARIANTS))


def test_report_provenance_lines_are_short_and_read_as_words() -> None:
    from residkit.cli import _summary

    assert _summary({"residkit": "0.1.0", "torch": "2.13.0"}) == "residkit 0.1.0, torch 2.13.0"
    per_tensor = {f"w{i}": "Q4_1" for i in range(200)} | {"norm": "F32"}
    assert _summary(per_tensor) == "1 F32, 200 Q4_1"  # counted, not 201 entries
    assert _summary({"a.safetensors": {"sha256": "x"}, "b.json": {"sha256": "y"}}) == "2 files"
    assert _summary(3.5) == "3.5"
