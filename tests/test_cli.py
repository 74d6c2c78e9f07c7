"""Bad input at the command line: one line naming what is wrong, exit code 2, nothing lost."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mezo_vllm.cli import main



def _tune(*args):
    return CliRunner().invoke(main, ["tune", *args])


@pytest.mark.parametrize("args, message", [
    (["--task", "sst2", "--eps", "0"], "--eps must be > 0"),
    (["--task", "sst2", "--lr", "-1"], "--lr must be > 0"),
    (["--task", "sst2", "--batch-size", "0"], "--batch-size must be > 0"),
    (["--task", "nope"], "unknown task"),
    ([], "exactly one of --task NAME or --data FILE"),
    (["--task", "sst2", "--targets", "q_proj,nope_proj"], "nope_proj"),
    (["--task", "sst2", "--model", "/nonexistent/model"], "not an HF model folder"),
    (["--task", "sst2", "--estimator", "momentum", "--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--task", "sst2", "--estimator", "lozo", "--lozo-rank", "0"], "--lozo-rank must be ≥ 1"),
    (["--task", "sst2", "--objective", "f1"], "--objective f1 scores generated answers"),
])
def test_bad_settings(tmp_path, args, message):
    result = _tune("--out", str(tmp_path / "run"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_bad_data_names_file_line_and_field(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "options": ["x", "y"], "label": 0}\n'
                    '{"prompt": "b", "options": ["x", "y"], "label": 2}\n')
    result = _tune("--out", str(tmp_path / "run"), "--data", str(data))
    assert result.exit_code == 2
    assert f"{data}:2: label" in result.output


def test_existing_run_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "trajectory.jsonl").write_text("precious\n")
    result = _tune("--out", str(run), "--task", "sst2")
    assert result.exit_code == 2 and "--resume" in result.output
    assert (run / "trajectory.jsonl").read_text() == "precious\n"
