"""The command line: verify's JSON and exit codes; bad model names get one line and exit 2."""

import json

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
