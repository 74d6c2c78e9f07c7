"""Faults that end a run in one line with nothing already written lost: a second process
writing the run folder (exit 2, its pid named), a full disk during a log append or a save
(exit 1, the last checkpoint intact, the resumed run exact), and vLLM failing while it starts
(exit 1, the cause named). The stand-in engine of test_trainer_loop.py trains; the start-up
failure replaces vLLM's `LLM` (no engine starts)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import SafetensorError

import mezo_vllm.adapter
import mezo_vllm.trainer
from mezo_vllm import rundir
from mezo_vllm.cli import main
from mezo_vllm.model import resolve_model
from mezo_vllm.trainer import tune
from test_trainer_loop import StandInEngine, _cfg

ARGS = ["--task", "sst2", "--steps", "20", "--eval-every", "0", "--eval-examples", "10", "--save-every", "5",
        "--lr", "1e-3"]  # the CLI spelling of test_trainer_loop's _cfg


@pytest.fixture
def stand_in(monkeypatch, tokenizer):
    """The CLI's engine is the stand-in."""

    def start_engine(cfg, model_dir, adapter):
        engine = StandInEngine(tokenizer)
        engine.load_master(adapter)
        return engine

    monkeypatch.setattr(mezo_vllm.trainer, "start_engine", start_engine)


def _tune(*args) -> tuple[int, list[str]]:
    """Exit code and the one-line verdicts (error:/stopped:) of a CLI run."""
    result = CliRunner().invoke(main, ["tune", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, [line for line in result.stderr.splitlines() if line.startswith(("error:", "stopped:"))]


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _same_run(a: Path, b: Path) -> None:
    assert (a / "trajectory.jsonl").read_text() == (b / "trajectory.jsonl").read_text()
    assert (a / "adapter/adapter_model.safetensors").read_bytes() == (b / "adapter/adapter_model.safetensors").read_bytes()


# --------------------------------------------------------------------------- a second writer

_HOLDER = r"""
import sys, time
from pathlib import Path
from mezo_vllm import rundir

with rundir.locked(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_writer_is_refused_and_a_killed_ones_lock_is_free(tmp_path, tokenizer, stand_in):
    run = tmp_path / "run"
    tune(_cfg(tmp_path, "run", steps=6), engine=StandInEngine(tokenizer))
    assert not (run / rundir.LOCK).exists()  # a run that ended left no lock file
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = _files(run)
        refusal = (f"error: {run}: another process (pid {holder.pid}) is writing this run folder; "
                   "wait for it to end or stop it")
        assert _tune("--resume", run, "--steps", "8") == (2, [refusal])
        assert _tune("--out", run, *ARGS, "--overwrite") == (2, [refusal])
        assert _files(run) == before  # nothing tidied, truncated or deleted
    finally:
        holder.kill()
        holder.wait()
    assert (run / rundir.LOCK).read_text() == f"{holder.pid}\n"  # SIGKILL left the file, not the lock
    assert _tune("--resume", run, "--steps", "8") == (0, [])
    assert len((run / "trajectory.jsonl").read_text().splitlines()) == 8


# --------------------------------------------------------------------------- a full disk

def _no_space(path: Path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_full_disk_during_a_log_append(tmp_path, tokenizer, stand_in, monkeypatch):
    tune(_cfg(tmp_path, "whole"), engine=StandInEngine(tokenizer))
    run, append = tmp_path / "run", rundir.append_jsonl

    def full_at_step_12(path, record):
        if path.name == "trajectory.jsonl" and record["step"] == 12:
            with path.open("a") as f:
                f.write(json.dumps(record)[:20])  # the part of the line that fitted
            raise _no_space(path)
        append(path, record)

    monkeypatch.setattr(rundir, "append_jsonl", full_at_step_12)
    assert _tune("--out", run, *ARGS) == (1, [
        f"stopped: no space left on the device of {run} (writing {run}/trajectory.jsonl); the last checkpoint (step 10) "
        f"is intact; free some space, then continue with: mezo-vllm tune --resume {run}"])
    assert rundir.load_checkpoint(run)[1] == 10
    monkeypatch.setattr(rundir, "append_jsonl", append)
    assert _tune("--resume", run) == (0, [])
    _same_run(run, tmp_path / "whole")


def test_a_full_disk_during_a_save(tmp_path, tokenizer, stand_in, monkeypatch):
    """The save of step 10's checkpoint runs out of space halfway through its safetensors file
    (safetensors then raises its own error, which names the OS error in its message)."""
    tune(_cfg(tmp_path, "whole"), engine=StandInEngine(tokenizer))
    run, save_file, checkpoint_files = tmp_path / "run", mezo_vllm.adapter.save_file, []

    def full_at_the_third(tensors, filename):
        if Path(filename).parent.parent.name.startswith(".checkpoint-"):  # a checkpoint being written
            checkpoint_files.append(filename)
            if len(checkpoint_files) == 3:  # step 5: adapter and best; step 10: adapter
                Path(filename).write_bytes(b"\0" * 1000)
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        save_file(tensors, filename)

    monkeypatch.setattr(mezo_vllm.adapter, "save_file", full_at_the_third)
    code, verdict = _tune("--out", run, *ARGS)
    assert (code, verdict) == (1, [
        f"stopped: no space left on the device of {run}; the last checkpoint (step 5) "
        f"is intact; free some space, then continue with: mezo-vllm tune --resume {run}"])
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # the half-written save is gone
    assert rundir.load_checkpoint(run)[1] == 5
    monkeypatch.setattr(mezo_vllm.adapter, "save_file", save_file)
    assert _tune("--resume", run) == (0, [])
    _same_run(run, tmp_path / "whole")


# --------------------------------------------------------------------------- vLLM failing to start

def test_a_failure_while_vllm_starts_is_one_line_naming_the_cause(tmp_path, monkeypatch):
    """Whatever vLLM raises while it starts (here: too little memory for its KV cache) ends the
    run in one line; the engine asked vLLM for the rank rounded up to one vLLM accepts."""
    import vllm

    asked = {}

    class FailingLLM:
        def __init__(self, **kwargs):
            asked.update(kwargs)
            raise ValueError("1 validation error for VllmConfig\n  Value error, 1.00 GiB KV cache is needed, "
                             "0.20 GiB is free [type=value_error]\n  more lines")

    monkeypatch.setattr(vllm, "LLM", FailingLLM)
    run = tmp_path / "run"
    model = resolve_model(None).resolve()
    assert _tune("--out", run, "--task", "sst2", "--rank", "12") == (1, [
        f"error: vLLM failed to start on {model} (ValueError: 1.00 GiB KV cache is needed, 0.20 GiB is free); "
        f"vLLM's log: {run}/engine.log"])
    assert asked["max_lora_rank"] == 16 and asked["enable_lora"]
    assert json.loads((run / "config.json").read_text())["rank"] == 12
