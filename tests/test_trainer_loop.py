"""The step loop's bookkeeping (resume, non-finite losses, interrupts), on a stand-in engine.

The stand-in scores with a smooth function of the variant's adapter weights, so these tests run
in seconds; the real engine is tested in test_engine.py and test_tune.py.
"""

from __future__ import annotations

import json
import math
import signal

import numpy as np
import pytest
import torch

import mezo_vllm.trainer
from mezo_vllm.adapter import LoraAdapter, LoraSpec, Update, model_linear_shapes
from mezo_vllm.config import TuneConfig
from mezo_vllm.model import resolve_model
from mezo_vllm.reference import InProcessMaster
from mezo_vllm.trainer import EngineFailed, TrainingStopped, tune


class StandInEngine(InProcessMaster):
    """Score = −(1 + mean of request ids)·Σ(B + 0.01)²: depends on every variant's weights."""

    max_model_len = 1024

    def __init__(self, tokenizer, fail_at_call: int | None = None, nan_calls: set[int] = frozenset(),
                 interrupt_at_call: int | None = None):
        self.tokenizer = tokenizer
        self.calls = 0
        self.fail_at_call, self.nan_calls, self.interrupt_at_call = fail_at_call, nan_calls, interrupt_at_call

    def score(self, requests, variants) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise RuntimeError("engine died")
        if self.calls == self.interrupt_at_call:
            signal.raise_signal(signal.SIGINT)
        rows = []
        for v in variants:
            weights = self.adapter.tensors if v is None else self.variants[v]
            energy = sum(float(((t + 0.01) ** 2).sum()) for k, t in weights.items() if "lora_B" in k)
            rows.append([-(1 + np.mean(c.token_ids) % 7 + c.target) * (0.1 + energy)
                         for r in requests for c in r.columns()])
        scores = np.array(rows)
        return scores * math.nan if self.calls in self.nan_calls else scores


def _cfg(tmp_path, name, **overrides):
    values = dict(out=str(tmp_path / name), task="sst2", steps=20, lr=1e-3, eval_every=0, save_every=5,
                  eval_examples=10)
    values.update(overrides)
    return TuneConfig(**values)


def _files(run):
    return (run / "trajectory.jsonl").read_text(), {
        k: v for k, v in LoraAdapter.load(run / "adapter").tensors.items()}


def test_resume_after_a_crash_is_exact(tmp_path, tokenizer):
    tune(_cfg(tmp_path, "whole"), engine=StandInEngine(tokenizer))
    with pytest.raises(EngineFailed, match="engine died"):
        tune(_cfg(tmp_path, "crashed"), engine=StandInEngine(tokenizer, fail_at_call=14))
    crashed = tmp_path / "crashed"
    assert json.loads((crashed / "checkpoint/state.json").read_text())["step"] == 10
    # call 1 is the dev evaluation, so call 14 is step 12: steps 0-11 were logged, 10 and 11 past the checkpoint
    assert len((crashed / "trajectory.jsonl").read_text().splitlines()) == 12
    tune(_cfg(tmp_path, "crashed"), resume=True, engine=StandInEngine(tokenizer))
    whole_log, whole = _files(tmp_path / "whole")
    resumed_log, resumed = _files(crashed)
    assert resumed_log == whole_log
    assert all(torch.equal(resumed[k], v) for k, v in whole.items())
    assert any(v.abs().max() > 0 for k, v in whole.items() if "lora_B" in k)


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, tokenizer):
    engine = StandInEngine(tokenizer, nan_calls={4})  # call 1 is the dev evaluation: call 4 is step 2
    tune(_cfg(tmp_path, "one", steps=6), engine=engine)
    records = [json.loads(line) for line in (tmp_path / "one/trajectory.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in records] == [False, False, True, False, False, False]
    assert all(math.isfinite(t.abs().max().item()) for t in LoraAdapter.load(tmp_path / "one/adapter").tensors.values())

    engine = StandInEngine(tokenizer, nan_calls=set(range(4, 100)))
    with pytest.raises(TrainingStopped, match="5 steps in a row had a non-finite loss"):
        tune(_cfg(tmp_path, "many"), engine=engine)
    assert json.loads((tmp_path / "many/checkpoint/state.json").read_text())["step"] == 7  # steps 2-6


class RecordingEngine(StandInEngine):
    """θ recorded each time variants are written: at the start of every step (and evaluation)."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.thetas = []

    def write_variants(self, writes):
        self.thetas.append({k: v.clone() for k, v in self.adapter.tensors.items()})
        super().write_variants(writes)


@pytest.mark.parametrize("poison", [
    (math.nan, math.nan),   # g = NaN
    (math.inf, math.inf),   # g = Inf − Inf = NaN
    (math.inf, None),       # L(θ+εz) = +Inf only: g = +Inf
    (None, math.inf),       # L(θ−εz) = +Inf only: g = −Inf
    (None, -math.inf),      # g = +Inf
])
def test_a_non_finite_loss_leaves_theta_bitwise_unchanged(tmp_path, tokenizer, monkeypatch, poison):
    """README: a NaN/Inf loss skips the step, θ unchanged. Step 2's losses are replaced; θ is
    read where each step starts."""
    real, calls = mezo_vllm.trainer.batch_loss, []

    def batch_loss(split, requests, sums):
        losses = real(split, requests, sums)
        calls.append(len(calls))
        if len(calls) == 3:  # the third training step: step 2
            losses = np.array([v if p is None else p for v, p in zip(losses, poison)])
        return losses

    monkeypatch.setattr(mezo_vllm.trainer, "batch_loss", batch_loss)
    engine = RecordingEngine(tokenizer)
    tune(_cfg(tmp_path, "run", steps=5), engine=engine)
    records = [json.loads(line) for line in (tmp_path / "run/trajectory.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in records] == [False, False, True, False, False]
    assert not math.isfinite(records[2]["g"])
    before_step = engine.thetas[1:6]  # thetas[0]: the dev evaluation before step 0
    same = [all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(before_step, before_step[1:])]
    assert same == [False, False, True, False]  # only the skipped step left θ as it was
    metrics = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped_steps"] == 1


def test_interrupt_saves_a_checkpoint_and_stops(tmp_path, tokenizer):
    with pytest.raises(TrainingStopped, match="interrupted: stopped after step 7"):
        tune(_cfg(tmp_path, "int"), engine=StandInEngine(tokenizer, interrupt_at_call=8))
    assert json.loads((tmp_path / "int/checkpoint/state.json").read_text())["step"] == 7
    assert len((tmp_path / "int/trajectory.jsonl").read_text().splitlines()) == 7


def test_n_directions_average_their_estimates(tmp_path, tokenizer):
    """--directions n: n seeds per step, every ±εz scored in one call, the update their mean."""
    engine = StandInEngine(tokenizer)
    tune(_cfg(tmp_path, "n", steps=3, directions=3, lr_schedule="constant", normalise=0), engine=engine)
    records = [json.loads(line) for line in (tmp_path / "n/trajectory.jsonl").read_text().splitlines()]
    assert all(len(r["seeds"]) == 3 == len(set(r["seeds"])) and len(r["grads"]) == 3 for r in records)
    assert engine.calls == 1 + 3 + 1  # dev before, one call per step, dev after

    final = LoraAdapter.load(tmp_path / "n/adapter")
    replay = LoraAdapter.init(LoraSpec(), model_linear_shapes(resolve_model(None)), seed=0)
    for r in records:
        replay.apply(Update(terms=tuple((s, -1e-3 * g / 3) for s, g in zip(r["seeds"], r["grads"]))))
    assert all(torch.allclose(final.tensors[k], v, atol=1e-7) for k, v in replay.tensors.items())


def test_step_seeds_never_repeat_across_steps_and_directions():
    """Directions 0-63 keep the earlier seeds (old runs resume exactly); beyond them a step's
    seeds collide with no other step's (the old formula made direction 64 of step s direction
    0 of step s+1)."""
    from mezo_vllm.trainer import step_seed

    assert step_seed(0, 5, 3) == 5 * 64 + 3 and step_seed(2, 0, 0) == 2 * 1_000_003 * 64
    seeds = [step_seed(1, step, k) for step in range(50) for k in range(200)]
    assert len(set(seeds)) == len(seeds)


def test_resuming_a_finished_run_logs_nothing_twice(tmp_path, tokenizer):
    cfg = _cfg(tmp_path, "done", steps=4, save_every=2)
    tune(cfg, engine=StandInEngine(tokenizer))
    before = {name: (tmp_path / "done" / name).read_text() for name in ("metrics.jsonl", "trajectory.jsonl")}
    summary = tune(cfg, resume=True, engine=StandInEngine(tokenizer))
    after = {name: (tmp_path / "done" / name).read_text() for name in before}
    assert after == before
    assert summary["after"] == json.loads(before["metrics.jsonl"].splitlines()[-1])
    assert summary["before"]["step"] == 0


def test_a_resumed_run_with_other_steps_says_its_schedule_changed(tmp_path, tokenizer, capsys):
    tune(_cfg(tmp_path, "longer", steps=4, save_every=2), engine=StandInEngine(tokenizer))
    tune(_cfg(tmp_path, "longer", steps=6, save_every=2), resume=True, engine=StandInEngine(tokenizer))
    assert "the linear schedule now decays to 0 at step 6" in capsys.readouterr().err
    tune(_cfg(tmp_path, "longer", steps=8, save_every=2, lr_schedule="constant"), resume=True,
         engine=StandInEngine(tokenizer))
    assert "schedule" not in capsys.readouterr().out
