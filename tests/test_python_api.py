"""`from mezo_vllm import tune, TuneConfig` with records in memory: the README's example runs (on the
shared engine), and a run from memory is a run folder like any other (on a stand-in engine)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import mezo_vllm
from mezo_vllm.cli import main
from mezo_vllm.config import ConfigError, TuneConfig
from mezo_vllm.data import DataError
from mezo_vllm.recipe import read_saved_config
from mezo_vllm.outputs import dev_lines
from mezo_vllm.trainer import tune
from test_trainer_loop import StandInEngine

EXAMPLE = Path(__file__).parents[1] / "examples" / "python_api.py"
RECORDS = [{"prompt": f"Review {i}: it was", "options": [" bad", " good"], "label": i % 2} for i in range(12)]


def test_import_is_light_and_the_api_is_lazy():
    code = ("import sys, mezo_vllm\n"
            "heavy = [m for m in ('torch', 'vllm', 'transformers', 'mezo_vllm.trainer') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "from mezo_vllm import TuneConfig, tune\n"
            "from mezo_vllm.trainer import tune as t\nfrom mezo_vllm.config import TuneConfig as C\n"
            "assert tune is t and TuneConfig is C\n"
            "try:\n    mezo_vllm.nothing\nexcept AttributeError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "module 'mezo_vllm' has no attribute 'nothing'"
    assert set(mezo_vllm.__all__) == {"TuneConfig", "tune", "__version__"}


def test_records_in_memory_become_the_runs_data_files_and_it_resumes(tmp_path, tokenizer, capsys):
    out = tmp_path / "run"
    cfg = TuneConfig(out=str(out), steps=4, lr=1e-3, eval_every=0, save_every=2)
    summary = tune(cfg, engine=StandInEngine(tokenizer), data=RECORDS[:8], eval_data=RECORDS[8:])
    assert summary["before"]["accuracy"] is not None and summary["after"]["step"] == 4
    saved = json.loads((out / "config.json").read_text())
    assert (saved["data"], saved["eval_data"]) == (str(out / "data.jsonl"), str(out / "eval_data.jsonl"))
    assert [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()] == RECORDS[:8]
    assert "warning" not in capsys.readouterr().err  # dev data was given
    # continued from the files alone, as `mezo-vllm tune --resume RUN --steps 6` does
    resumed = read_saved_config(str(out)).resumed(str(out), {"steps": 6})
    tune(resumed, resume=True, engine=StandInEngine(tokenizer))
    assert len((out / "trajectory.jsonl").read_text().splitlines()) == 6


def test_records_in_memory_are_checked_before_anything_is_written(tmp_path, tokenizer):
    cfg = TuneConfig(out=str(tmp_path / "run"), steps=2)
    bad = [*RECORDS[:3], {"prompt": "p", "options": [" a", " b"], "label": 2}]
    with pytest.raises(DataError, match=r"^data\[3\]: label: 2 out of range for 2 options"):
        tune(cfg, engine=StandInEngine(tokenizer), data=bad)
    with pytest.raises(ConfigError, match=r"tune\(data=\.\.\.\) is given records and the config a data file"):
        tune(TuneConfig(out=str(tmp_path / "run"), data="train.jsonl"), engine=StandInEngine(tokenizer), data=RECORDS)
    assert not (tmp_path / "run").exists()


def test_eval_split_evaluates_held_out_records_and_no_dev_data_is_warned(tmp_path, tokenizer, capsys):
    engine = StandInEngine(tokenizer)
    cfg = TuneConfig(out=str(tmp_path / "split"), steps=2, eval_every=0, eval_split=0.25)
    tune(cfg, engine=engine, data=RECORDS)
    assert "warning" not in capsys.readouterr().err
    metrics = dev_lines([json.loads(line) for line in (tmp_path / "split/metrics.jsonl").read_text().splitlines()])
    assert [m["step"] for m in metrics] == [0, 2] and all("accuracy" in m for m in metrics)
    tune(TuneConfig(out=str(tmp_path / "none"), steps=2), engine=StandInEngine(tokenizer), data=RECORDS)
    (line,) = [w for w in capsys.readouterr().err.splitlines() if w.startswith("warning")]
    assert line.startswith("warning: data: dev data: none, so nothing is evaluated") and "--eval-split" in line


def test_no_dev_data_is_warned_on_the_command_line_once_checks_pass(tmp_path, monkeypatch):
    import mezo_vllm.trainer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    def no_engine(*args):
        raise ConfigError("stop here")

    monkeypatch.setattr(mezo_vllm.trainer, "start_engine", no_engine)
    result = CliRunner().invoke(main, ["tune", "--data", str(data), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert [line for line in result.output.splitlines() if not line.startswith("starting the engine")] == [
        f"warning: {data}: dev data: none, so nothing is evaluated before, during or after training: "
        "give --eval-data FILE, or --eval-split 0.1 to hold out a tenth of the training data",
        "error: stop here"]


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path, monkeypatch, engine_fp32, capsys):
    """examples/python_api.py as the README shows it; `tune` is given the shared engine, so the
    test does not start a second one (the code of the example is not changed)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mezo_vllm, "tune", lambda cfg, **kw: tune(cfg, engine=engine_fp32, **kw), raising=False)
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("dev accuracy ") and printed.endswith("adapter in runs/python-api/adapter")
    assert (tmp_path / "runs/python-api/adapter/adapter_model.safetensors").is_file()
    assert len((tmp_path / "runs/python-api/trajectory.jsonl").read_text().splitlines()) == 3
    assert len((tmp_path / "runs/python-api/data.jsonl").read_text().splitlines()) == 8
