"""The commands no other test runs to the end, and their documented one-line errors: `tasks`,
`export` (copy), `tune --overwrite` and `--eval-data` through the CLI on the stand-in engine,
`model prepare --force`, and the refusals that come after pre-flight (no example fits, more
variants than slots, a bad worker-patch setting)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_trainer_loop import StandInEngine

import mezo_vllm.trainer
from mezo_vllm.adapter import LoraAdapter, LoraSpec
from mezo_vllm.cli import main
from mezo_vllm.config import TuneConfig
from mezo_vllm.data import builtin_tasks
from mezo_vllm.engine import EngineConfig, VllmEngine
from mezo_vllm.outputs import dev_lines
from mezo_vllm.patches import plugin

README = Path(__file__).parent.parent / "README.md"


def _one_line(result, code: int, *fragments: str) -> None:
    """The error is one line, the last on stderr (notices and warnings may come before it)."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    message = lines[-1]
    assert message.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert [line for line in lines if line.startswith("error")] == [message], result.stderr
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture
def stand_in(monkeypatch, tokenizer) -> list[StandInEngine]:
    """`tune` on the CLI gets the stand-in engine (test_trainer_loop.py) instead of vLLM."""
    started: list[StandInEngine] = []

    def start_engine(cfg, model_dir, adapter):
        engine = StandInEngine(tokenizer)
        engine.load_master(adapter)
        started.append(engine)
        return engine

    monkeypatch.setattr(mezo_vllm.trainer, "start_engine", start_engine)
    return started


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- tasks


def test_tasks_lists_the_readme_table():
    """`mezo-vllm tasks` prints each built-in task's kind and split sizes: those of the README's
    "Built-in data" table."""
    result = CliRunner().invoke(main, ["tasks"])
    assert result.exit_code == 0, result.output
    printed = {}
    for line in result.output.splitlines():
        m = re.match(r"([\w-]+): (\w+), train (\d+) / dev (\d+) / test (\d+); ", line)
        assert m, line
        printed[m.group(1)] = (m.group(2), *map(int, m.group(3, 4, 5)))
    table = {}
    for row in README.read_text().split("## Built-in data")[1].split("\n## ")[0].splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in printed:
            table[cells[0]] = (cells[2], *(int(c.replace(",", "")) for c in cells[4:7]))
            assert int(cells[3].replace(",", "")) == sum(table[cells[0]][1:]), row  # rows = the splits
    assert printed == table and sorted(printed) == sorted(builtin_tasks())


# --------------------------------------------------------------------------- export


def _run_folder(tmp_path: Path, with_adapter: bool) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(TuneConfig(out=str(run), task="sst2").to_json()))
    if with_adapter:
        shapes = {f"model.layers.{i}.self_attn.{m}": (32, 16) for i in range(2) for m in ("q_proj", "v_proj")}
        LoraAdapter.init(LoraSpec(), shapes, seed=3).save(run / "adapter", base_model="base")
    return run


def test_export_copies_the_adapter(tmp_path):
    run = _run_folder(tmp_path, with_adapter=True)
    result = CliRunner().invoke(main, ["export", str(run), "--to", str(tmp_path / "out")])
    assert result.exit_code == 0 and result.output == f"wrote {tmp_path / 'out'}\n", result.output
    copied = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert copied == {p.name: p.read_bytes() for p in (run / "adapter").iterdir()}
    assert set(copied) == {"adapter_config.json", "adapter_model.safetensors"}
    loaded = LoraAdapter.load(tmp_path / "out")
    assert all(torch.equal(loaded.tensors[k], v) for k, v in LoraAdapter.load(run / "adapter").tensors.items())


def test_export_refuses_an_unfinished_run_and_an_existing_destination(tmp_path):
    run = _run_folder(tmp_path, with_adapter=False)
    for merge in ([], ["--merge"]):
        result = CliRunner().invoke(main, ["export", str(run), "--to", str(tmp_path / "out"), *merge])
        _one_line(result, 2, f"error: {run}: no adapter/adapter_model.safetensors (has the run finished?)")
    assert not (tmp_path / "out").exists()
    (tmp_path / "b").mkdir()
    done = _run_folder(tmp_path / "b", with_adapter=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("precious")
    result = CliRunner().invoke(main, ["export", str(done), "--to", str(tmp_path / "taken")])
    _one_line(result, 2, f"error: {tmp_path / 'taken'} exists: choose a new folder")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]


# --------------------------------------------------------------------------- validate's verdicts


@pytest.mark.parametrize("change, code, lines", [
    ({}, 0, ["pass  1 losses", "pass  6 prefix sharing", "pass  5 adapter-independent loss: g = 0"]),
    ({"prefix_sharing": {"max_loss_diff": 1e-3, "requests": 32, "context_tokens": 150}}, 1,
     ["FAIL  6 prefix sharing", "pass  1 losses"]),
    ({"adapter_independent_g": [0.0, 1e-9]}, 1, ["FAIL  5 adapter-independent loss: g = 0"]),
    ({"adapter_independent_g": None}, 0, ["not run  5 adapter-independent loss: g = 0", "pass  2 gradient"]),
])
def test_validate_exits_by_its_verdicts(tmp_path, monkeypatch, change, code, lines):
    """`validate` prints each check's verdict from results.json and exits 1 when one failed; a
    check that did not run says "not run", never "pass", and is no failure. The results are the
    committed report's (docs/validate), changed; the checks themselves are not run here."""
    import mezo_vllm.validate as V

    results = {**json.loads((README.parent / "docs/validate/results.json").read_text()), **change}
    out = tmp_path / "v"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(results))
    monkeypatch.setattr(V, "run_validate", lambda cfg, echo: out)
    result = CliRunner().invoke(main, ["validate", "--task", "sst2", "--out", str(out)])
    assert result.exit_code == code, result.output
    printed = result.output.splitlines()
    assert len(printed) == 5 and all(line in printed for line in lines), printed
    table = [line for line in V.report(results).splitlines() if line.startswith("| 5 adapter")]
    verdict = {True: "pass", False: "**FAIL**", None: "not run"}[V.passed(results)["5 adapter-independent loss: g = 0"]]
    assert table == [f"| 5 adapter-independent loss: g = 0 | {verdict} |"]


# --------------------------------------------------------------------------- tune on the CLI


def _sst2_rows(n: int, labels=None) -> list[dict]:
    return [{"prompt": f"Review {i}: it was", "options": [" terrible", " great"],
             "label": (i % 2) if labels is None else labels[i]} for i in range(n)]


def test_overwrite_replaces_a_finished_run(tmp_path, stand_in):
    """`--overwrite` on a finished run: the new run's files only, none of the old one's."""
    data = _jsonl(tmp_path / "train.jsonl", _sst2_rows(8))
    run = tmp_path / "run"
    common = ["tune", "--data", str(data), "--out", str(run), "--steps", "3", "--batch-size", "4",
              "--eval-every", "0", "--save-every", "0"]
    first = CliRunner().invoke(main, [*common, "--seed", "1"])
    assert first.exit_code == 0, first.output
    old_log = (run / "trajectory.jsonl").read_text()
    (run / "notes.txt").write_text("left by the old run")
    refused = CliRunner().invoke(main, [*common, "--seed", "2"])
    _one_line(refused, 2, f"{run} exists: pass --resume to continue it or --overwrite to replace it")
    second = CliRunner().invoke(main, [*common, "--seed", "2", "--overwrite"])
    assert second.exit_code == 0, second.output
    assert not (run / "notes.txt").exists()
    assert json.loads((run / "config.json").read_text())["seed"] == 2
    assert (run / "trajectory.jsonl").read_text() != old_log
    assert [r["step"] for r in _lines(run / "trajectory.jsonl")] == [0, 1, 2]
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and len(stand_in) == 2
    # the new run's log, where the terminal said it is: one run's header, not the old log's two
    assert (run / "engine.log").read_text().count("==== ") == 1


def test_eval_data_is_the_dev_split(tmp_path, stand_in):
    """--eval-data gives a --data run its dev metrics: the stand-in engine always ranks option 0
    first, so dev accuracy is the share of label 0 in the dev file (3 of 4), not the training
    file's (half)."""
    data = _jsonl(tmp_path / "train.jsonl", _sst2_rows(8))
    dev = _jsonl(tmp_path / "dev.jsonl", _sst2_rows(4, labels=[0, 1, 0, 0]))
    common = ["tune", "--data", str(data), "--steps", "2", "--batch-size", "4", "--eval-every", "1",
              "--save-every", "0"]
    result = CliRunner().invoke(main, [*common, "--eval-data", str(dev), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = dev_lines(_lines(tmp_path / "run" / "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert all(m["accuracy"] == 0.75 for m in metrics), metrics
    assert "dev accuracy 0.7500 → 0.7500" in result.output
    without = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "without")])
    assert without.exit_code == 0 and "dev accuracy" not in without.output  # no dev split, no metrics


def test_no_example_that_fits_is_one_line(tmp_path, stand_in):
    """Every completion longer than --max-length: nothing can be trained on."""
    data = _jsonl(tmp_path / "long.jsonl", [{"prompt": "a", "completion": " word" * 40}] * 3)
    result = CliRunner().invoke(main, ["tune", "--data", str(data), "--out", str(tmp_path / "run"),
                                       "--max-length", "16", "--steps", "1"])
    _one_line(result, 2, f"error: {data}: no example fits in 16 tokens")


# --------------------------------------------------------------------------- engine refusals


def test_more_variants_than_slots_are_refused_before_any_worker_call():
    engine = VllmEngine.__new__(VllmEngine)  # no vLLM: the check comes first
    engine.config = EngineConfig(model="m", n_variants=2)
    engine._rpc = lambda *a: pytest.fail("a worker was called")
    with pytest.raises(ValueError, match=r"^3 variants for 2 slots$"):
        engine.write_variants([(1, 0.1), (1, -0.1), (2, 0.1)])


def test_a_bad_worker_patch_setting_stops_the_worker(monkeypatch):
    """MEZO_VLLM_WORKER_PATCHES is set by the engine for its workers; any other value is refused
    where vLLM loads the plugin (a worker process: its start fails with this line)."""
    code = "from mezo_vllm.patches import plugin; plugin.load()"
    done = subprocess.run([sys.executable, "-c", code], env={"MEZO_VLLM_WORKER_PATCHES": "fast", "PATH": ""},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == \
        "ValueError: MEZO_VLLM_WORKER_PATCHES='fast': expected one of required, all, serve"
    monkeypatch.setenv(plugin.ENV, "")
    plugin.load()  # unset or empty: a stock vLLM, nothing applied


# --------------------------------------------------------------------------- model prepare


@pytest.mark.slow
def test_model_prepare_force_into_a_fresh_cache(tmp_path, model_dir):
    """`model prepare` in a MEZO_VLLM_CACHE that holds the model reuses the folder; with --force
    it converts the packaged GGUF again and replaces the folder whole, with the same weights.
    (One conversion: the cache starts as a copy of the shared one.)"""
    import os
    import shutil

    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    folder = cache / "models" / Path(model_dir).name
    shutil.copytree(model_dir, folder)
    (folder / "mine.txt").write_text("not part of a prepared model")
    env = {**os.environ, "MEZO_VLLM_CACHE": str(cache)}
    cli = [sys.executable, "-c", "from mezo_vllm.cli import main; main()", "model", "prepare"]

    def prepare(*flags: str) -> Path:
        done = subprocess.run([*cli, *flags], env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        return Path(done.stdout.strip().splitlines()[-1])

    assert prepare() == folder and (folder / "mine.txt").exists()  # cached: left as it is
    assert prepare("--force") == folder
    assert not (folder / "mine.txt").exists()  # converted again, the folder replaced whole
    assert [p for p in (cache / "models").iterdir() if p.is_dir()] == [folder]  # no temporary folder left
    ours = {k: v for p in sorted(folder.glob("*.safetensors")) for k, v in load_file(p).items()}
    shared = {k: v for p in sorted(Path(model_dir).glob("*.safetensors")) for k, v in load_file(p).items()}
    assert ours.keys() == shared.keys() and all(torch.equal(ours[k], shared[k]) for k in ours)
