"""Faults a run must survive: kills during a save, torn logs, an engine that dies mid-run,
Ctrl-C and SIGKILL of the real CLI followed by --resume, bad adapter and model files.

Each test injects the fault for real (a child process killed with SIGKILL, an exception raised
inside a vLLM worker RPC or by vLLM's generate) and checks what is on disk afterwards.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mezo_vllm.engine
import mezo_vllm.trainer
from mezo_vllm.adapter import LoraAdapter, LoraSpec, model_linear_shapes, resolve_targets
from mezo_vllm.cli import main
from mezo_vllm.config import TuneConfig
from mezo_vllm.rundir import load_checkpoint, save_checkpoint
from mezo_vllm.trainer import EngineFailed, tune
from test_trainer_loop import StandInEngine, _cfg

# --------------------------------------------------------------------------- checkpoints under SIGKILL

# A child that saves checkpoints of the real model's all-linear r=8 adapter (~10 MB) in a loop,
# every tensor filled with the step number, printing each step once its save returned.
_SAVER = r"""
import sys
from pathlib import Path
from mezo_vllm.adapter import LoraAdapter, LoraSpec, model_linear_shapes, resolve_targets
from mezo_vllm.rundir import load_checkpoint, save_checkpoint

run, model = Path(sys.argv[1]), sys.argv[2]
shapes = model_linear_shapes(model)
adapter = LoraAdapter.init(LoraSpec(targets=resolve_targets(["all-linear"], shapes)), shapes, seed=0)
loaded = load_checkpoint(run)
step = loaded[1] if loaded else 0
print("ready", step, flush=True)
while True:
    step += 1
    for t in adapter.tensors.values():
        t.fill_(step)
    save_checkpoint(run, adapter, model, step)
    print(step, flush=True)
"""

KILLS = 12


def _assert_whole(run: Path, step: int, spec: LoraSpec) -> None:
    adapter, loaded_step = load_checkpoint(run)
    assert loaded_step == step
    assert adapter.spec == spec
    assert all(torch.equal(t, torch.full_like(t, step)) for t in adapter.tensors.values())


def test_sigkill_at_random_moments_of_many_saves_leaves_a_whole_checkpoint(tmp_path, model_dir):
    run = tmp_path / "run"
    run.mkdir()
    shapes = model_linear_shapes(model_dir)
    spec = LoraSpec(targets=resolve_targets(["all-linear"], shapes))
    rng = random.Random(0)
    last, left_behind = 0, Counter()
    for _ in range(KILLS):
        child = subprocess.Popen([sys.executable, "-c", _SAVER, str(run), model_dir],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().split() == ["ready", str(last)]  # resumed from the last one
        time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        saved = [int(line) for line in child.stdout.read().split()]
        child.stdout.close()
        finished = saved[-1] if saved else last
        left_behind.update(p.name.rsplit("-", 1)[0] for p in run.iterdir() if p.name != "checkpoint")
        loaded = load_checkpoint(run)
        # the save that returned last, or the one under way if the kill came after its rename
        assert loaded is not None and loaded[1] in (finished, finished + 1)
        _assert_whole(run, loaded[1], spec)
        assert [p.name for p in run.iterdir()] == ["checkpoint"]  # leftovers tidied away
        last = loaded[1]
    assert last > KILLS
    assert left_behind[".checkpoint"] >= KILLS // 4, left_behind  # most kills hit a save midway


# Dies (os._exit, as abruptly as SIGKILL) at one chosen point of the save of step 2.
_CRASHER = r"""
import os, shutil, sys
from pathlib import Path
from mezo_vllm import rundir
from mezo_vllm.adapter import LoraAdapter, LoraSpec

run, point = Path(sys.argv[1]), sys.argv[2]
shapes = {f"model.layers.{i}.self_attn.{m}": (32, 16) for i in range(2) for m in ("q_proj", "v_proj")}
adapter = LoraAdapter.init(LoraSpec(), shapes, seed=0)
for t in adapter.tensors.values():
    t.fill_(1)
rundir.save_checkpoint(run, adapter, "m", 1)
for t in adapter.tensors.values():
    t.fill_(2)
renames, real_replace, real_rmtree = [], os.replace, shutil.rmtree

def replace(src, dst):
    if point == f"before rename {len(renames) + 1}":
        os._exit(9)
    real_replace(src, dst)
    renames.append(dst)

def rmtree(path, ignore_errors=False):
    if point == "while removing the old one" and Path(path).name == ".checkpoint-old" and Path(path).exists():
        os.remove(next(p for p in Path(path).rglob("*") if p.is_file()))
        os._exit(9)
    real_rmtree(path, ignore_errors=ignore_errors)

def fsync_tree(folder):
    if point == "while writing":
        os.remove(folder / "state.json")
        os._exit(9)

os.replace, shutil.rmtree = replace, rmtree
if point == "while writing":
    rundir.fsync_tree = fsync_tree
rundir.save_checkpoint(run, adapter, "m", 2)
os._exit(0)
"""


@pytest.mark.parametrize("point, step", [
    ("while writing", 1),
    ("before rename 1", 1),
    ("before rename 2", 1),  # no `checkpoint` at all: the previous one waits under .checkpoint-old
    ("while removing the old one", 2),
    ("after the save", 2),
])
def test_sigkill_at_each_point_of_a_save(tmp_path, point, step):
    run = tmp_path / "run"
    run.mkdir()
    code = subprocess.run([sys.executable, "-c", _CRASHER, str(run), point]).returncode
    assert code == (0 if point == "after the save" else 9)
    if point == "before rename 2":
        assert not (run / "checkpoint").exists() and (run / ".checkpoint-old/state.json").exists()
    spec = LoraSpec()
    _assert_whole(run, step, spec)
    assert [p.name for p in run.iterdir()] == ["checkpoint"]
    adapter = LoraAdapter(spec, {k: torch.full_like(v, 3) for k, v in load_checkpoint(run)[0].tensors.items()})
    save_checkpoint(run, adapter, "m", 3)  # and the run goes on saving
    _assert_whole(run, 3, spec)


def test_a_checkpoint_is_fsynced_before_it_is_renamed_in(tmp_path, monkeypatch):
    """README: "written under a temporary name, fsynced, renamed in". Every file and folder of
    the new checkpoint reaches os.fsync (the real one) before the rename that publishes it, and
    the run folder's entry after it; the first save and one that replaces a checkpoint."""
    import os

    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(Path(src).resolve()), str(Path(dst).resolve())))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run = (tmp_path / "run").resolve()
    run.mkdir()
    spec = LoraSpec()
    shapes = {f"model.layers.{i}.self_attn.{m}": (32, 16) for i in range(2) for m in ("q_proj", "v_proj")}
    dest = run / "checkpoint"
    for step in (1, 2):
        events.clear()
        save_checkpoint(run, LoraAdapter.init(spec, shapes, seed=step), "m", step)
        published = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(dest)]
        assert len(published) == 1, events
        at, tmp = published[0], events[published[0]][1]
        synced_before = {e[1] for e in events[:at] if e[0] == "fsync"}
        tree = [dest, *dest.rglob("*")]
        assert len(tree) == 5, tree  # the folder, adapter/, its two files, state.json
        for path in tree:
            assert tmp + str(path)[len(str(dest)):] in synced_before, (path, events)
        assert ("fsync", str(run)) in events[at + 1:], events
        assert [e[0] for e in events].count("rename") == step  # the second save moves the old one aside first


# --------------------------------------------------------------------------- torn logs

def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock times, which differ between any two runs."""
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _tear(path: Path, record: dict) -> None:
    """What SIGKILL in the middle of writing a line leaves: part of it, no newline."""
    with path.open("a") as f:
        f.write(json.dumps(record)[:17])


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path, tokenizer, capsys):
    tune(_cfg(tmp_path, "whole", eval_every=5), engine=StandInEngine(tokenizer))
    # scoring calls: 1 dev, 2-6 steps 0-4, 7 dev, 8-12 steps 5-9, 13 dev, 14-16 steps 10-12
    with pytest.raises(EngineFailed, match="after 12 steps"):
        tune(_cfg(tmp_path, "torn", eval_every=5), engine=StandInEngine(tokenizer, fail_at_call=16))
    torn = tmp_path / "torn"
    _tear(torn / "trajectory.jsonl", {"step": 13, "seed": 1, "g": 0.5})
    _tear(torn / "metrics.jsonl", {"step": 15, "accuracy": 0.5})
    tune(_cfg(tmp_path, "torn", eval_every=5), resume=True, engine=StandInEngine(tokenizer))
    printed = capsys.readouterr().err
    for log in ("trajectory.jsonl", "metrics.jsonl"):
        assert f"{torn / log}: dropped its torn last line (the run was killed while writing it)\n" in printed
    assert (torn / "trajectory.jsonl").read_text() == (tmp_path / "whole/trajectory.jsonl").read_text()
    assert _metrics(torn) == _metrics(tmp_path / "whole")
    assert LoraAdapter.load(torn / "adapter").tensors.keys() == LoraAdapter.load(tmp_path / "whole/adapter").tensors.keys()
    assert all(torch.equal(LoraAdapter.load(torn / "adapter").tensors[k], v)
               for k, v in LoraAdapter.load(tmp_path / "whole/adapter").tensors.items())


def test_a_torn_line_in_the_middle_is_refused(tmp_path, tokenizer):
    tune(_cfg(tmp_path, "run", steps=6), engine=StandInEngine(tokenizer))
    log = tmp_path / "run/trajectory.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    damaged = "".join(lines[:2]) + lines[2][:17] + "".join(lines[3:])
    log.write_text(damaged)
    result = CliRunner().invoke(main, ["tune", "--resume", str(tmp_path / "run"), "--steps", "8"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {log}:3: not a JSON record with an integer step"
    assert log.read_text() == damaged  # nothing rewritten


# --------------------------------------------------------------------------- engine faults (stand-in)

class FailingEngine(StandInEngine):
    """The stand-in, with one engine call raising at its n-th use."""

    def __init__(self, tokenizer, call: str, at: int):
        super().__init__(tokenizer)
        real, uses = getattr(self, call), itertools.count(1)

        def failing(*args, **kwargs):
            if next(uses) == at:
                raise ConnectionError("replica 1 is gone")
            return real(*args, **kwargs)

        setattr(self, call, failing)


@pytest.mark.parametrize("call, at, done, checkpoint", [
    ("score", 9, "7 steps", 5),  # call 1 is the dev evaluation, call 9 step 7
    ("write_variants", 3, "1 step", None),
    ("apply_update", 12, "11 steps", 10),
    ("master", 3, "10 steps", 5),  # call 1 keeps best/ at step 0, call 3 is the save after step 10
])
def test_an_engine_fault_stops_the_run_with_everything_written_intact(tmp_path, tokenizer, call, at, done,
                                                                     checkpoint):
    run = tmp_path / "run"
    with pytest.raises(EngineFailed) as info:
        tune(_cfg(tmp_path, "run"), engine=FailingEngine(tokenizer, call, at))
    kept = (f"the last checkpoint (step {checkpoint}) is intact" if checkpoint is not None
            else "no checkpoint was written yet (a resumed run starts from step 0)")
    assert str(info.value) == (f"the engine failed after {done} ({call}: ConnectionError: replica 1 is gone); "
                               f"{kept}; continue with: mezo-vllm tune --resume {run}")
    assert isinstance(info.value.__cause__, ConnectionError)
    records = [json.loads(line) for line in (run / "trajectory.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(int(done.split()[0])))
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["config.json", "metrics.jsonl", "trajectory.jsonl", "engine.log", "best"]
        + (["checkpoint"] if checkpoint is not None else []))
    if checkpoint is not None:
        assert load_checkpoint(run)[1] == checkpoint


def test_skipped_steps_are_counted_across_a_resume(tmp_path, tokenizer):
    """Steps 2 and 3 score NaN (calls 4, 5; call 1 is the dev evaluation), then the engine dies
    at step 10: the resumed run's final metrics still count the two skipped steps."""
    tune(_cfg(tmp_path, "whole"), engine=StandInEngine(tokenizer, nan_calls={4, 5}))
    engine = StandInEngine(tokenizer, nan_calls={4, 5}, fail_at_call=12)
    with pytest.raises(EngineFailed, match=r"after 10 steps .* checkpoint \(step 10\)"):
        tune(_cfg(tmp_path, "resumed"), engine=engine)
    tune(_cfg(tmp_path, "resumed"), resume=True, engine=StandInEngine(tokenizer))
    assert _metrics(tmp_path / "resumed")[-1]["skipped_steps"] == 2
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "whole")
    assert (tmp_path / "resumed/trajectory.jsonl").read_text() == (tmp_path / "whole/trajectory.jsonl").read_text()


def test_the_cli_reports_an_engine_fault_in_one_line(tmp_path, tokenizer, monkeypatch):
    def start_engine(cfg, model_dir, adapter):
        engine = StandInEngine(tokenizer, fail_at_call=14)
        engine.load_master(adapter)
        return engine

    monkeypatch.setattr(mezo_vllm.trainer, "start_engine", start_engine)
    run = tmp_path / "run"
    args = ["tune", "--task", "sst2", "--steps", "20", "--eval-every", "0", "--eval-examples", "10",
            "--save-every", "5", "--out", str(run)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert [line for line in result.stderr.splitlines() if line.startswith(("stopped:", "error:"))] == [
        f"stopped: the engine failed after 12 steps (score: RuntimeError: engine died); the last checkpoint "
        f"(step 10) is intact; continue with: mezo-vllm tune --resume {run}"]


def test_a_bug_outside_the_engine_is_not_called_an_engine_fault(tmp_path, tokenizer, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug of the loop")

    monkeypatch.setattr(mezo_vllm.trainer, "batch_loss", broken)
    with pytest.raises(ZeroDivisionError, match="a bug of the loop"):
        tune(_cfg(tmp_path, "run", eval_examples=0), engine=StandInEngine(tokenizer))


# --------------------------------------------------------------------------- engine faults (real vLLM)

def _real_cfg(tmp_path: Path, name: str) -> TuneConfig:
    return TuneConfig(out=str(tmp_path / name), task="sst2", steps=8, batch_size=4, directions=1, lr=5e-3, eval_every=0,
                      eval_examples=4, save_every=3, dtype="float32")


def _same_run(a: Path, b: Path) -> None:
    assert (a / "trajectory.jsonl").read_text() == (b / "trajectory.jsonl").read_text()
    assert (a / "adapter/adapter_model.safetensors").read_bytes() == (b / "adapter/adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def real_whole(tmp_path_factory, engine_fp32) -> Path:
    tmp = tmp_path_factory.mktemp("real")
    tune(_real_cfg(tmp, "whole"), engine=engine_fp32)
    return tmp / "whole"


@pytest.mark.slow
def test_a_vllm_worker_rpc_failing_mid_run_then_resume_is_exact(tmp_path, engine_fp32, real_whole, monkeypatch):
    """The update RPC raises inside the vLLM worker at step 5; the run stops, resumes exactly."""
    from mezo_vllm.worker import MezoWorkerExtension

    real, calls = MezoWorkerExtension.mezo_apply_update, []

    def apply(worker, update):
        calls.append(update)
        if len(calls) == 6:
            raise RuntimeError("worker lost its device")
        return real(worker, update)

    monkeypatch.setattr(MezoWorkerExtension, "mezo_apply_update", apply)
    cfg = _real_cfg(tmp_path, "faulted")
    with pytest.raises(EngineFailed, match=r"^the engine failed after 5 steps \(apply_update: .*worker lost its device.*\); "
                                           r"the last checkpoint \(step 3\) is intact; continue with: "
                                           rf"mezo-vllm tune --resume {tmp_path / 'faulted'}$"):
        tune(cfg, engine=engine_fp32)
    assert len((tmp_path / "faulted/trajectory.jsonl").read_text().splitlines()) == 5
    monkeypatch.setattr(MezoWorkerExtension, "mezo_apply_update", real)
    tune(cfg, resume=True, engine=engine_fp32)
    _same_run(tmp_path / "faulted", real_whole)


@pytest.mark.slow
def test_vllm_generate_dying_mid_run_then_resume_is_exact(tmp_path, engine_fp32, real_whole, monkeypatch):
    """vLLM's own EngineDeadError out of generate at step 4's scoring."""
    from vllm.v1.engine.exceptions import EngineDeadError

    real, calls = engine_fp32.llm.generate, []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # call 1 is the dev evaluation
            raise EngineDeadError()
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_fp32.llm, "generate", generate)
    cfg = _real_cfg(tmp_path, "dead")
    with pytest.raises(EngineFailed, match=r"^the engine failed after 4 steps \(score: EngineDeadError: .*\); "
                                           r"the last checkpoint \(step 3\) is intact"):
        tune(cfg, engine=engine_fp32)
    monkeypatch.setattr(engine_fp32.llm, "generate", real)
    tune(cfg, resume=True, engine=engine_fp32)
    _same_run(tmp_path / "dead", real_whole)


# --------------------------------------------------------------------------- the real CLI: SIGINT, SIGKILL, resume

CLI_STEPS = 16
# fp32 as the in-process engine it is compared with (auto is bf16 on a CPU with AMX)
_CLI_ARGS = ["--task", "sst2", "--steps", str(CLI_STEPS), "--batch-size", "4", "--directions", "1", "--lr", "5e-3",
             "--eval-every", "4", "--eval-examples", "4", "--save-every", "4", "--dtype", "float32"]


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def _checkpoint_step(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint/state.json").read_text())["step"]
    except (OSError, ValueError):
        return -1


def _start(args: list[str], log: Path) -> subprocess.Popen:
    cli = Path(sys.executable).with_name("mezo-vllm")
    with log.open("w") as f:
        return subprocess.Popen([str(cli), "tune", *args], stdout=f, stderr=subprocess.STDOUT)


def _wait_until(child: subprocess.Popen, log: Path, condition, timeout: float = 300) -> None:
    """Poll the run folder (no sleeps tuned to this machine's speed)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert child.poll() is None, f"exited with {child.returncode} first:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)


@pytest.mark.slow
def test_cli_ctrl_c_then_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, engine_fp32):
    """One run stopped by SIGINT, resumed, SIGKILLed after a checkpoint, resumed again: the final
    adapter is bitwise the uninterrupted run's (same seed, in this test's own engine), and the
    trajectory is the same file."""
    whole = tmp_path / "whole"
    tune(TuneConfig(out=str(whole), task="sst2", steps=CLI_STEPS, batch_size=4, directions=1, lr=5e-3, eval_every=4,
                    eval_examples=4, save_every=4, dtype="float32"), engine=engine_fp32)
    run = tmp_path / "run"

    first = _start([*_CLI_ARGS, "--out", str(run)], tmp_path / "1.log")
    _wait_until(first, tmp_path / "1.log", lambda: _lines(run / "trajectory.jsonl") >= 3)
    first.send_signal(signal.SIGINT)  # finishes its step, checkpoints, exits
    assert first.wait(timeout=120) == 1
    stopped = _checkpoint_step(run)
    out = (tmp_path / "1.log").read_text()
    assert f"stopped: interrupted: stopped after step {stopped}, checkpoint saved; continue with: " \
           f"mezo-vllm tune --resume {run}" in out, out[-2000:]
    assert 3 <= stopped < 8 and _lines(run / "trajectory.jsonl") == stopped
    assert not (run / "adapter").exists()

    second = _start(["--resume", str(run)], tmp_path / "2.log")
    _wait_until(second, tmp_path / "2.log",
                lambda: _checkpoint_step(run) >= 8 and _lines(run / "trajectory.jsonl") >= 10)
    second.send_signal(signal.SIGKILL)
    assert second.wait(timeout=60) == -signal.SIGKILL
    killed_at = _checkpoint_step(run)
    assert killed_at < CLI_STEPS and not (run / "adapter").exists()
    assert _lines(run / "trajectory.jsonl") > killed_at  # lines past the checkpoint, for the resume to drop

    third = _start(["--resume", str(run)], tmp_path / "3.log")
    assert third.wait(timeout=300) == 0, (tmp_path / "3.log").read_text()[-3000:]
    assert (run / "trajectory.jsonl").read_text() == (whole / "trajectory.jsonl").read_text()
    assert _metrics(run) == _metrics(whole)
    assert (run / "adapter/adapter_model.safetensors").read_bytes() == \
        (whole / "adapter/adapter_model.safetensors").read_bytes()
    assert any(v.abs().max() > 0 for k, v in LoraAdapter.load(run / "adapter").tensors.items() if "lora_B" in k)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    assert (run / "best/adapter_model.safetensors").read_bytes() == (whole / "best/adapter_model.safetensors").read_bytes()
    assert _summary(run) == _summary(whole)
    # a quiet terminal: our lines only (the engine starting, ready, the step-0 dev metric before
    # the first bar), vLLM's in engine.log
    first, last = (tmp_path / "1.log").read_text(), (tmp_path / "3.log").read_text()
    assert len([line for line in first[:first.index("MeZO:")].splitlines() if line.strip()]) == 3, first[:3000]
    assert "WARNING" not in first + last, (first + last)[:3000]
    assert f"done: {CLI_STEPS} steps in" in last and f"best adapter: {run.absolute() / 'best'}" in last
    assert "WARNING" in (run / "engine.log").read_text()


def _summary(run: Path) -> dict:
    """summary.json without its time, paths spelled relative to the run."""
    text = (run / "summary.json").read_text().replace(str(run.absolute()), "RUN")
    return {k: v for k, v in json.loads(text).items() if k != "wall_s"}


# --------------------------------------------------------------------------- safe loading

class EngineStarted(Exception):
    """Raised by the recording engine once it has seen its config: the run need go no further."""


def test_trust_remote_code_reaches_the_engine_only_when_asked(tmp_path, monkeypatch, initial_adapter, model_dir):
    """tests/test_preflight.py checks the config; this checks what vLLM is given, by tune and eval."""
    seen = []

    class Recorder:
        def __init__(self, config, adapter):
            seen.append(config.trust_remote_code)
            raise EngineStarted

    monkeypatch.setattr(mezo_vllm.engine, "VllmEngine", Recorder)
    initial_adapter.save(tmp_path / "adapter", base_model=model_dir)
    for n, extra in enumerate([[], ["--trust-remote-code"]]):
        for args in (["tune", "--task", "sst2", "--out", str(tmp_path / str(n))],
                     ["eval", "--task", "sst2", "--adapter", str(tmp_path / "adapter")]):
            assert isinstance(CliRunner().invoke(main, [*args, *extra]).exception, EngineStarted)
    assert seen == [False, False, True, True]


def test_pickle_only_adapter_and_model_are_refused_by_the_cli(tmp_path, initial_adapter, model_dir):
    adapter = tmp_path / "adapter"
    initial_adapter.save(adapter, base_model=model_dir)
    tensors = {k: v for k, v in initial_adapter.tensors.items()}
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    result = CliRunner().invoke(main, ["eval", "--adapter", str(adapter), "--task", "sst2"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {adapter}: no adapter_model.safetensors "
                                     "(pickled adapter_model.bin is refused: convert it to safetensors)")

    model = tmp_path / "model"
    shutil.copytree(model_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"w": torch.zeros(2)}, model / "pytorch_model.bin")
    result = CliRunner().invoke(main, ["tune", "--task", "sst2", "--model", str(model), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {model}: only pickled weights (pytorch_model.bin): refused, since "
                                     "unpickling can run arbitrary code; convert them to *.safetensors")
    assert not (tmp_path / "r").exists()
