"""The command line: bad values are usage errors naming the argument; a bad plan file is an error line."""
import json

import pytest

from sparsify import cli


@pytest.mark.parametrize("argv,words", [
    (["--ffn-sparsity", "1.5"], "--ffn-sparsity: 1.5 is out of range"),
    (["--max-error", "-1"], "--max-error: -1 is out of range"),
    (["--batch", "0"], "--batch: 0 is out of range"),
    (["--seq", "1000"], "--seq: 1000 is out of range"),
    (["--batch", "x"], "'x' is not an int"),
    (["--pattern", "block7:0.5"], "--pattern"),
])
def test_demo_rejects_bad_values_with_a_usage_error(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo"] + argv)
    assert e.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("content,words", [("[1, 2]", "a plan is a JSON object"), ("{}", "plan version"),
                                           ("not json", "cannot read plan")])
def test_report_of_a_bad_plan_file_is_one_error_line(content, words, tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text(content)
    assert cli.main(["report", str(path)]) == 2
    assert words in capsys.readouterr().err


def test_report_prints_a_saved_plan(tmp_path, capsys):
    import sparsify
    from tests.helpers import MLP, mlp_input

    sm = sparsify.compile(MLP(), (mlp_input(),), sparsify.Config(weight=sparsify.Dense()), progress=False)
    sm.plan.to_json(tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["version"] == 2
    assert cli.main(["report", str(tmp_path / "plan.json")]) == 0
    assert "fc1" in capsys.readouterr().out
