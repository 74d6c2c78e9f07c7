"""What a run publishes: best/, adapter/, numbered checkpoints, train lines, summary.json,
TensorBoard, the progress bar and the closing lines; and that a resumed run publishes exactly
what an uninterrupted one does (also when it was killed after best/ moved past its checkpoint).

The stand-in engine of test_trainer_loop.py trains; the dev metric is scripted per step (the
stand-in's own accuracy hardly moves), so the best step is known.
"""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest

import mezo_vllm.trainer
from mezo_vllm import rundir
from mezo_vllm.trainer import DiskFull, EngineFailed, tune
from test_trainer_loop import StandInEngine, _cfg

# dev accuracy after each number of steps; the best is at 15, and 5 is the best up to 10
ACCURACY = {0: 0.5, 5: 0.6, 10: 0.55, 15: 0.9, 20: 0.7}


@pytest.fixture
def scripted(monkeypatch):
    """evaluate() → the scripted metric at the steps done (nll: lower is better, so 1 − accuracy)."""

    def use(metric: str) -> None:
        def evaluate(engine, split, variant):
            value = ACCURACY.get(engine.steps_done, 0.1)
            return {metric: value if metric == "accuracy" else 1 - value}

        monkeypatch.setattr(mezo_vllm.trainer, "evaluate", evaluate)

    return use


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _weights(folder: Path) -> bytes:
    return (folder / "adapter_model.safetensors").read_bytes()


def _summary(run: Path) -> dict:
    """summary.json without its time, paths spelled relative to the run."""
    text = (run / "summary.json").read_text().replace(str(run.absolute()), "RUN")
    return {k: v for k, v in json.loads(text).items() if k != "wall_s"}


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in _lines(run / "metrics.jsonl")]


@pytest.mark.parametrize("metric", ["accuracy", "nll"])
def test_best_final_and_numbered_adapters_and_the_summary(tmp_path, tokenizer, scripted, metric, capsys):
    scripted(metric)
    run = tmp_path / "run"
    tune(_cfg(tmp_path, "run", eval_every=5, save_total_limit=3), engine=StandInEngine(tokenizer))
    numbered = rundir.numbered_checkpoints(run)
    assert list(numbered) == [10, 15, 20]  # the newest 3 of 5, 10, 15, 20
    assert _weights(run / "best") == _weights(numbered[15]) != _weights(numbered[20]) == _weights(run / "adapter")
    value = {s: v if metric == "accuracy" else 1 - v for s, v in ACCURACY.items()}
    saved = json.loads((run / "summary.json").read_text())
    assert saved["wall_s"] > 0
    assert {k: v for k, v in saved.items() if k != "wall_s"} == {
        "steps": 20, "metric": metric, "initial_metric": value[0], "final_metric": value[20],
        "best_step": 15, "best_metric": value[15],
        "adapter": str(run.absolute() / "adapter"), "best_adapter": str(run.absolute() / "best"),
        "checkpoints": [str(p.absolute()) for p in numbered.values()],
        "serve": f"mezo-vllm serve {run.absolute() / 'best'}"}
    printed = capsys.readouterr().err
    assert f"best adapter: {run.absolute() / 'best'} (step 15)\n" in printed
    assert f"; dev {metric} {value[0]:.4f} → {value[20]:.4f}, best {value[15]:.4f} at step 15\n" in printed
    assert f"serve it:     {saved['serve']}\n" in printed
    assert (run / "curves.png").is_file()


def test_train_lines_and_the_progress_bar(tmp_path, tokenizer, capsys):
    """Each step's train loss (mean of ±ε), its moving average, lr and |g| in metrics.jsonl, and
    the average, lr and |g| on the bar. One direction, whose two losses the trajectory keeps;
    with several, |g| is the mean of their |g|."""
    run = tmp_path / "run"
    tune(_cfg(tmp_path, "run", steps=6, directions=1), engine=StandInEngine(tokenizer))
    train = [r for r in _lines(run / "metrics.jsonl") if "train_loss" in r]
    steps = _lines(run / "trajectory.jsonl")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    raw = 0.0
    for k, (line, step) in enumerate(zip(train, steps), start=1):
        loss = (step["loss_plus"] + step["loss_minus"]) / 2
        raw = 0.9 * raw + 0.1 * loss
        assert line == pytest.approx({"step": k, "train_loss": loss, "train_loss_ema": raw / (1 - 0.9 ** k),
                                      "lr": step["lr"], "abs_g": abs(step["g"])}, rel=1e-12)
    bar = capsys.readouterr().err.split("\r")[-1]
    last = train[-1]
    assert f"loss={last['train_loss_ema']:.4f}, lr={last['lr']:.2e}, |g|={last['abs_g']:.3g}, tok/s=" in bar
    tune(_cfg(tmp_path, "three", steps=2, directions=3), engine=StandInEngine(tokenizer))
    train = [r for r in _lines(tmp_path / "three/metrics.jsonl") if "train_loss" in r]
    steps = _lines(tmp_path / "three/trajectory.jsonl")
    assert [line["abs_g"] for line in train] == pytest.approx([sum(map(abs, s["grads"])) / 3 for s in steps])
    assert all(len(s["grads"]) == 3 and len(set(s["grads"])) == 3 for s in steps)


@pytest.mark.parametrize("metric", ["f1", "nll"])
def test_a_dev_metric_falling_behind_the_start_is_said_once(tmp_path, tokenizer, monkeypatch, metric, capsys):
    """SQuAD with the SST-2 lr: dev F1 0.12 → 0.36 at step 25, then 0.0 (nll 2.8 → 11.6). The
    first fall 5% behind the start gets one line naming best/'s step; noise within 5% gets none;
    a resumed sitting reads the start from metrics.jsonl."""
    f1 = {0: 0.2, 5: 0.195, 10: 0.4, 15: 0.0, 20: 0.05}  # 0.195: within 5% of the start

    def evaluate(engine, split, variant):
        value = f1[engine.steps_done]
        return {metric: value if metric == "f1" else 3.0 - 10 * value}

    monkeypatch.setattr(mezo_vllm.trainer, "evaluate", evaluate)
    cfg = _cfg(tmp_path, "run", eval_every=5)
    with pytest.raises(EngineFailed):
        tune(cfg, engine=StandInEngine(tokenizer, fail_at_call=18))  # in step 18; checkpoint at 15
    said = [line for line in capsys.readouterr().err.splitlines() if "worse than at the start" in line]
    value = {s: v if metric == "f1" else 3.0 - 10 * v for s, v in f1.items()}
    assert said == [f"step 15: dev {metric} {value[15]:.4f} is worse than at the start ({value[0]:.4f}): training "
                    "is making the model worse (the lr may be too large for this task: try a smaller --lr); "
                    f"best/ keeps step 10 ({value[10]:.4f})"]
    tune(cfg, resume=True, engine=StandInEngine(tokenizer))  # from step 15's checkpoint: step 20 falls again
    said = [line for line in capsys.readouterr().err.splitlines() if "worse than at the start" in line]
    assert [line.split(":")[0] for line in said] == ["step 20"]


def test_a_skipped_step_logs_no_loss(tmp_path, tokenizer):
    tune(_cfg(tmp_path, "run", steps=4), engine=StandInEngine(tokenizer, nan_calls={3}))  # call 3: step 1
    train = [r for r in _lines(tmp_path / "run/metrics.jsonl") if "train_loss" in r]
    assert [r["train_loss"] is None for r in train] == [False, True, False, False]
    assert train[1]["train_loss_ema"] == train[0]["train_loss_ema"] and train[1]["abs_g"] is None
    assert "NaN" not in (tmp_path / "run/metrics.jsonl").read_text()  # strict JSON


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_resumed_run_publishes_what_an_uninterrupted_one_does(tmp_path, tokenizer, scripted, monkeypatch):
    """Killed at step 17, best/ (step 15) is past the checkpoint (step 10): resumed, the run
    publishes the uninterrupted run's best/, adapters, numbered checkpoints, metrics, summary
    and TensorBoard scalars. Stopped by a full disk at its last checkpoint/ (after
    checkpoint-20/) and resumed with --steps 12: those of a 12-step run (best/ is then step
    5's, taken back from the checkpoint, and checkpoint-20/ is gone)."""
    scripted("accuracy")
    settings = dict(eval_every=5, save_every=10, save_total_limit=2, lr_schedule="constant",
                    report_to="tensorboard")
    tune(_cfg(tmp_path, "whole", **settings), engine=StandInEngine(tokenizer))
    tune(_cfg(tmp_path, "short", **settings, steps=12), engine=StandInEngine(tokenizer))
    with pytest.raises(EngineFailed, match=r"after 17 steps .*checkpoint \(step 10\)"):
        tune(_cfg(tmp_path, "resumed", **settings), engine=StandInEngine(tokenizer, fail_at_call=18))
    assert _weights(tmp_path / "resumed/best") == _weights(tmp_path / "whole/best")  # step 15's

    save = rundir.save_checkpoint

    def full_at_20(run, adapter, base_model, step, best=None):
        if step == 20:
            raise OSError(errno.ENOSPC, "No space left on device", str(run / "checkpoint"))
        save(run, adapter, base_model, step, best)

    monkeypatch.setattr(rundir, "save_checkpoint", full_at_20)
    with pytest.raises(DiskFull, match=r"checkpoint \(step 10\) is intact"):
        tune(_cfg(tmp_path, "cut", **settings), engine=StandInEngine(tokenizer))
    monkeypatch.setattr(rundir, "save_checkpoint", save)
    assert list(rundir.numbered_checkpoints(tmp_path / "cut")) == [10, 20]

    tune(_cfg(tmp_path, "resumed", **settings), resume=True, engine=StandInEngine(tokenizer))
    tune(_cfg(tmp_path, "cut", **settings, steps=12), resume=True, engine=StandInEngine(tokenizer))

    for got, want in ((tmp_path / "resumed", tmp_path / "whole"), (tmp_path / "cut", tmp_path / "short")):
        assert _summary(got) == _summary(want)
        assert _metrics(got) == _metrics(want)
        assert _weights(got / "best") == _weights(want / "best")
        assert _weights(got / "adapter") == _weights(want / "adapter")
        numbered = rundir.numbered_checkpoints(got)
        assert list(numbered) == list(rundir.numbered_checkpoints(want))
        assert all(_weights(p) == _weights(want / p.name) for p in numbered.values())
        assert _scalars(got) == _scalars(want)
    assert _summary(tmp_path / "cut")["best_step"] == 5
    assert _summary(tmp_path / "whole")["best_step"] == 15
    assert set(_scalars(tmp_path / "whole")) == {"train/train_loss", "train/train_loss_ema", "train/lr",
                                                 "train/abs_g", "dev/accuracy"}
    assert [s for s, _ in _scalars(tmp_path / "whole")["dev/accuracy"]] == [0, 5, 10, 15, 20]


def test_a_run_without_dev_data_has_no_best(tmp_path, tokenizer):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} is", "completion": " a number"}) + "\n" for i in range(8)))
    cfg = _cfg(tmp_path, "run", task=None, data=str(data), steps=3, batch_size=2)
    summary = tune(cfg, engine=StandInEngine(tokenizer))
    assert not (tmp_path / "run/best").exists()
    assert (summary["best_step"], summary["best_adapter"], summary["metric"]) == (None, None, None)
    assert summary["serve"] == f"mezo-vllm serve {(tmp_path / 'run/adapter').absolute()}"
    assert math.isfinite(summary["wall_s"])
