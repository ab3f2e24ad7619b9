"""The verify command: runs, reports JSON, exits 0 when every claim holds."""

import json

from residkit import cli, zoo


def test_verify_json_on_a_zoo_folder(capsys, tmp_path) -> None:
    path = zoo.build("gemma3", size="tiny")
    code = cli.main(["verify", "--model", str(path), "--json", "--out", str(tmp_path)])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0, payload
    assert payload["passed"] is True
    sections = {c["section"] for c in payload["checks"]}
    assert {"load", "capture", "markov", "kv", "qk_spectra", "kvdirect", "baselines"} <= sections
    assert any(c["figure"] for c in payload["checks"])


def test_verify_missing_model_exits_2(capsys) -> None:
    assert cli.main(["verify", "--model", "no-such-org/no-such-model"]) == 2
    assert "no-such-org/no-such-model" in capsys.readouterr().err
