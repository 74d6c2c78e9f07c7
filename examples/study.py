"""The study of issue 12: which MeZO settings reach the best SST-2 accuracy in the least wall time.

    python examples/study.py run [--setting GLOB ...] [--seeds 0,1,2]
    python examples/study.py list                 # the grid, and which runs are done
    python examples/study.py report               # table (mean ± std over seeds) and plot
    python examples/study.py templates            # zero-shot accuracy of SST-2 prompt templates
    python examples/study.py tail-average RUN...  # dev accuracy of the mean of a run's last K adapters

Each setting changes one thing from `mezo-vllm tune`'s former defaults (SST-2 in MeZO's template,
task `sst2-mezo`, fp32, lr 2e-3 linear,
ε 1e-2, batch 16, LoRA r8 on q/v, ZO-SGD, 300 steps): the axes are ε, lr, schedule (constant,
linear, cosine, warmup), n directions with lr scaled with n, rank 1 vs 8, q/v vs all-linear, B
only, sparse perturbations, batch size, and the update rules (momentum, LOZO, FZOO). Settings
that cost more per step (n directions, FZOO) take fewer steps, so that every setting scores about
as many forward passes as the default. The bf16 settings (ε 1e-2/3e-2/1e-1) run only where the
CPU has native bf16 (AVX512-BF16 or AMX): elsewhere bf16 is emulated, ~9× slower than fp32,
and they are skipped with a message.

Every run is `mezo_vllm.trainer.tune` (the product, on one engine per engine shape, started as
`tune` starts it): its folder is `runs/study/<setting>-s<seed>/`, its result
`runs/study/<setting>-s<seed>.json` (settings, seed, steps, wall time, dev curve, and the test
accuracy, read once, when the run has finished). Choices are made on dev; test is only reported.
A sitting of a run is bounded by `--minutes`: the run then stops as on Ctrl-C (the step ends, a
checkpoint is written) and the next `run` resumes it exactly. Runs already done are skipped, so
`run` can be called again until the grid is complete. Wall time is the training time of all
sittings (dev evaluations included) plus one engine start, as a `mezo-vllm tune` user waits.
"""

from __future__ import annotations

import fnmatch
import json
import math
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import click

from mezo_vllm.estimator import variant_slots
from mezo_vllm.platform_policy import native_bf16

ROOT = Path("runs/study")
SEEDS = (0, 1, 2)
LR = 2e-3
# the library's defaults when the grid was drawn up: fp32 (as auto was on every CPU), one direction, lr 2e-3,
# g not normalised
BASE = dict(task="sst2-mezo", dtype="float32", directions=1, lr=LR, steps=300, eval_every=25, save_every=50,
            normalise=0)


@dataclass(frozen=True)
class Setting:
    name: str
    axis: str  # which axis of the grid it varies, for the table
    overrides: dict[str, Any] = field(default_factory=dict)  # TuneConfig fields changed from BASE

    @property
    def changes(self) -> str:
        """What the setting changes, without the bookkeeping (how often it evaluates)."""
        return ", ".join(f"{k}={v}" for k, v in self.overrides.items() if k not in ("eval_every", "save_every")) or "—"


def _n(n: int) -> dict[str, Any]:
    """n directions per step at n× the lr (MeZO's lr cap grows as n/(d+n−1)) and 1/n the steps:
    as many forward passes as the default."""
    return dict(directions=n, lr=LR * n, steps=BASE["steps"] // n, eval_every=max(BASE["eval_every"] // n, 1))


def _fzoo(n: int, lr: float) -> dict[str, Any]:
    """FZOO scores n + 1 variants a step (the default 2): steps scaled to the same forward passes."""
    steps = BASE["steps"] * 2 // (n + 1)
    return dict(estimator="fzoo", directions=n, lr=lr, steps=steps, eval_every=max(steps // 12, 1))


def _review(**overrides: Any) -> dict[str, Any]:
    """`bf16-10min-n4-review` (task sst2, bf16, 4 directions, lr 4e-3, 300 steps) with `overrides`."""
    return {**dict(task="sst2", dtype="bfloat16", directions=4, lr=4e-3, steps=300, eval_every=25), **overrides}


def _default(**overrides: Any) -> dict[str, Any]:
    """The defaults since 2026-12-06 (`review-n4-norm-25-lr-8e-3`: 4 directions, lr 8e-3, g
    normalised over 25 steps) with `overrides`."""
    return _review(**{"lr": 8e-3, "normalise": 25, **overrides})


GRID: tuple[Setting, ...] = (
    Setting("base", "defaults"),
    *(Setting(f"eps-{e}", "ε", dict(eps=float(e))) for e in ("3e-3", "3e-2", "1e-1")),
    *(Setting(f"lr-{v}", "lr", dict(lr=float(v))) for v in ("1e-3", "4e-3", "8e-3")),
    Setting("constant", "schedule", dict(lr_schedule="constant")),
    Setting("cosine", "schedule", dict(lr_schedule="cosine")),
    Setting("linear-warmup-30", "schedule", dict(warmup_steps=30)),
    Setting("cosine-warmup-30", "schedule", dict(lr_schedule="cosine", warmup_steps=30)),
    Setting("n4-lr-x4", "n directions", _n(4)),
    Setting("n16-lr-x16", "n directions", _n(16)),
    Setting("r1", "parameterization", dict(rank=1, alpha=2.0)),  # α/r = 2 as for r8 α16
    Setting("r1-lr-x4", "parameterization", dict(rank=1, alpha=2.0, lr=LR * 4)),
    Setting("all-linear", "parameterization", dict(targets=("all-linear",))),
    Setting("b-only", "parameterization", dict(train_only="B")),
    Setting("b-only-lr-x2", "parameterization", dict(train_only="B", lr=LR * 2)),
    Setting("sparse-0.75", "sparsity", dict(sparsity=0.75)),
    Setting("sparse-0.75-lr-x4", "sparsity", dict(sparsity=0.75, lr=LR * 4)),
    Setting("batch-8", "batch size", dict(batch_size=8)),
    Setting("batch-32", "batch size", dict(batch_size=32)),
    Setting("momentum", "update rule", dict(estimator="momentum")),
    Setting("lozo", "update rule", dict(estimator="lozo")),
    Setting("fzoo-n4-lr-3e-3", "update rule", _fzoo(4, 3e-3)),
    Setting("fzoo-n4-lr-1e-2", "update rule", _fzoo(4, 1e-2)),
    Setting("fzoo-n8-lr-1e-2", "update rule", _fzoo(8, 1e-2)),
    *(Setting(f"bf16-eps-{e}", "engine dtype", dict(dtype="bfloat16", eps=float(e))) for e in ("1e-2", "3e-2", "1e-1")),
    # What a 10-minute budget buys where bf16 is native (AMX: bf16 scores ~2.6x the tokens/s of
    # fp32): as many forward passes as fit in ~8.5 minutes of training, for the three ways of
    # spending them (one direction, n directions, FZOO). lr 1e-3 for one direction: 2e-3 diverges
    # in long bf16 runs (docs/quality.md).
    Setting("bf16-10min-mezo", "10-minute budget", dict(dtype="bfloat16", lr=1e-3, steps=1200, eval_every=100,
                                                        save_every=200)),
    Setting("bf16-10min-n4", "10-minute budget", dict(dtype="bfloat16", directions=4, lr=4e-3, steps=300,
                                                      eval_every=25)),
    Setting("bf16-10min-fzoo-n4", "10-minute budget", dict(dtype="bfloat16", estimator="fzoo", directions=4,
                                                           lr=1e-2, steps=480, eval_every=40, save_every=80)),
    # The prompt: SST-2 in the template of `templates` with the best zero-shot accuracy on train
    # and dev (the task `sst2`), with the library's defaults (bf16: auto on AMX) and with the best
    # 10-minute setting above.
    Setting("bf16-review", "prompt template", dict(task="sst2", dtype="bfloat16")),
    Setting("bf16-10min-n4-review", "prompt template", dict(task="sst2", dtype="bfloat16", directions=4, lr=4e-3,
                                                            steps=300, eval_every=25)),
    Setting("bf16-10min-n4-review-450", "prompt template", dict(task="sst2", dtype="bfloat16", directions=4,
                                                                lr=4e-3, steps=450, eval_every=25)),
    # The 10-minute n4 setting on task sst2, one change each. MeZO's rate is ∝ n/d (d the
    # perturbed parameters): rank 1 perturbs 1/8 of rank 8's entries and B only about half, so
    # they may take a proportionally larger lr.
    Setting("review-n4-lr-8e-3", "10 minutes, task sst2", _review(lr=8e-3)),
    Setting("review-n4-lr-1.6e-2", "10 minutes, task sst2", _review(lr=1.6e-2)),
    Setting("review-n4-r1-lr-x4", "10 minutes, task sst2", _review(rank=1, alpha=2.0, lr=1.6e-2)),
    Setting("review-n4-r1-lr-x8", "10 minutes, task sst2", _review(rank=1, alpha=2.0, lr=3.2e-2)),
    Setting("review-n4-b-only-lr-x2", "10 minutes, task sst2", _review(train_only="B", lr=8e-3)),
    # As many forward passes, spent on more directions of fewer examples: the direction noise
    # (∝ d/n, d ≈ 460k) dwarfs the data noise (∝ 1/batch), and lr ∝ √n keeps the update noise as n4's
    Setting("review-n8-b8-lr-1.1e-2", "10 minutes, task sst2", _review(directions=8, batch_size=8, lr=1.1e-2)),
    # g divided by the RMS of the last 25 steps' g's (--normalise): the same step length on a
    # loss whose |g| is 3-15 (SQuAD's answer NLL, where lr 8e-3 diverges) as on SST-2's (|g| ≈ 1
    # at the start, so lr 8e-3 starts as the default does; later SST-2 steps shrink as |g| grows).
    Setting("review-n4-norm-25-lr-8e-3", "10 minutes, task sst2", _review(lr=8e-3, normalise=25)),
    Setting("review-n4-norm-25-lr-1.2e-2", "10 minutes, task sst2", _review(lr=1.2e-2, normalise=25)),
    # The chosen default given a 30-minute budget (issue 12's second target): 1,100 steps. At lr
    # 8e-3 it collapses (dev 0.51 at step 200, the lr still 6.5e-3); a linear decay's summed
    # noise grows as lr²·steps, so 8e-3·√(300/1100) ≈ 4e-3 keeps the 300-step run's.
    Setting("review-n4-lr-8e-3-30min", "30 minutes, task sst2", _review(lr=8e-3, steps=1100, eval_every=50,
                                                                         save_every=100)),
    Setting("review-n4-lr-4e-3-30min", "30 minutes, task sst2", _review(lr=4e-3, steps=1100, eval_every=50,
                                                                         save_every=100)),
    # --normalise slows a run whose |g| climbs (what collapsed lr 8e-3 over 1,100 steps)
    Setting("review-n4-norm-25-lr-8e-3-30min", "30 minutes, task sst2",
            _review(lr=8e-3, normalise=25, steps=1100, eval_every=50, save_every=100)),
    # cosine led the 10-minute schedules on test (87.5 ± 1.0), so it is the 30-minute candidate
    Setting("review-n4-norm-25-lr-8e-3-cosine-30min", "30 minutes, task sst2",
            _default(lr_schedule="cosine", steps=1100, eval_every=50, save_every=100)),
    # The grid's other axes, one change each from today's defaults (`review-n4-norm-25-lr-8e-3`):
    # `python examples/study.py run --setting 'default-*'`
    *(Setting(f"default-{name}", "the defaults, one change", _default(**change)) for name, change in (
        ("constant", dict(lr_schedule="constant")),
        ("cosine", dict(lr_schedule="cosine")),
        ("warmup-30", dict(warmup_steps=30)),
        ("all-linear", dict(targets=("all-linear",))),
        ("sparse-0.75", dict(sparsity=0.75)),
        ("batch-32-150-steps", dict(batch_size=32, steps=150)),  # as many forward passes
        ("momentum", dict(estimator="momentum")),
        ("lozo", dict(estimator="lozo")),
        ("eps-3e-2", dict(eps=3e-2)),  # less bf16 rounding, but g strays from the slope (bf16_fidelity.py)
        # MeZO's lr cap grows as the perturbed entries d shrink: rank 1 has 1/8 of them, B only 1/2
        ("r1-lr-x4", dict(rank=1, alpha=2.0, lr=3.2e-2)),
        ("r1-lr-x2", dict(rank=1, alpha=2.0, lr=1.6e-2)),  # x4 collapsed (dev 0.66 at step 50)
        ("b-only-lr-x2", dict(train_only="B", lr=1.6e-2)),
    )),
    # A larger model, the lever the grid left (issue 12's anchors are OPT-13B): the embedded Gemma-3-270M,
    # a base model with twice SmolLM2-135M's parameters, with the defaults unchanged
    Setting("gemma3-270m-defaults", "model", _default(model="gemma3-270m")),
    # at the defaults' lr Gemma peaks by step 50 (dev 0.87) and falls back to 0.77-0.82: a smaller step
    *(Setting(f"gemma3-270m-lr-{lr}", "model", _default(model="gemma3-270m", lr=float(lr))) for lr in ("4e-3", "2e-3")),
    # The clean-pass curvature rule needs fp32 (in bf16 at ε 1e-2 its second difference is
    # rounding; at ε 1e-1 g no longer follows the slope: bf16_fidelity.py), which costs 2× the
    # step here, so half the steps for the same 10 minutes. A probe at θ₀ (8 steps, fp32, ε 1e-2)
    # measured a mean step curvature of 32 and RMS g 0.65, so lr 0.4 takes the defaults' first
    # step length (8e-3·g/RMS). lr 0.4 led on seed 0's dev (0.84 against 0.81) and got 3 seeds.
    *(Setting(f"curvature-fp32-150-steps-lr-{lr}", "update rule, fp32, 10 minutes",
              _default(estimator="curvature", dtype="float32", steps=150, lr=float(lr))) for lr in ("0.4", "0.8")),
)
BY_NAME = {s.name: s for s in GRID}


def run_name(setting: Setting, seed: int) -> str:
    return f"{setting.name}-s{seed}"


def config(setting: Setting, seed: int, root: Path, steps: int | None = None):
    """The run's TuneConfig. `steps` (a smoke or pilot run) replaces the setting's steps; warmup,
    eval and save intervals shrink with it (to 0: dev only before and after, a checkpoint at the
    end or when a sitting stops)."""
    from mezo_vllm.config import TuneConfig

    values = {**BASE, **setting.overrides, "seed": seed, "out": str(root / run_name(setting, seed))}
    if steps is not None:
        scale = steps / values["steps"]
        values.update({key: int(values.get(key, 0) * scale) for key in ("warmup_steps", "eval_every", "save_every")},
                      steps=steps)
    return TuneConfig(**values)


def _engine_key(cfg: Any) -> tuple:
    """What an engine is started with (`trainer.start_engine`): runs that agree share one."""
    return (cfg.model, cfg.dtype, cfg.rank, tuple(cfg.targets), variant_slots(cfg.estimator, cfg.directions),
            cfg.max_length, cfg.compile)


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _records(root: Path, setting: Setting) -> list[dict[str, Any]]:
    """The result files of a setting's runs, one per seed run so far."""
    paths = [p for p in sorted(root.glob(f"{setting.name}-s*.json"))
             if p.stem.rsplit("-s", 1)[0] == setting.name and p.stem.rsplit("-s", 1)[1].isdigit()]
    return [json.loads(p.read_text()) for p in paths]


def _as_saved(cfg: Any) -> dict[str, Any]:
    """The config as a result file holds it (JSON: tuples become lists)."""
    return json.loads(json.dumps(cfg.to_json()))


def _save(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def _settings(patterns: Sequence[str]) -> list[Setting]:
    if not patterns:
        return list(GRID)
    chosen = [s for s in GRID if any(fnmatch.fnmatch(s.name, p) for p in patterns)]
    unknown = [p for p in patterns if not any(fnmatch.fnmatch(s.name, p) for s in GRID)]
    if unknown:
        raise click.UsageError(f"--setting {unknown[0]}: no setting matches (see `study.py list`)")
    return chosen


def _integers(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: a comma-separated list of integers") from None


# --------------------------------------------------------------------------- running

class _Budget:
    """The run's engine, asking the loop to stop once this sitting has lasted `seconds`: it
    raises SIGINT after an update, so the loop ends the step and checkpoints as on Ctrl-C (an
    update happens only inside a step, never in an evaluation)."""

    def __init__(self, engine: Any, seconds: float):
        self._engine, self._deadline, self.reached = engine, time.perf_counter() + seconds, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def apply_update(self, update: Any) -> None:
        self._engine.apply_update(update)
        if not self.reached and time.perf_counter() > self._deadline:
            self.reached = True
            signal.raise_signal(signal.SIGINT)


def _dev_curve(run: Path) -> list[dict[str, float]]:
    from mezo_vllm.outputs import dev_lines

    path = run / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return [{"step": m["step"], "accuracy": m["accuracy"], "wall_s": m["wall_s"]} for m in dev_lines(lines)]


def _test_accuracy(engine: Any, cfg: Any, adapter: Path) -> tuple[float, int]:
    """An adapter of the finished run on the whole test split, in the engine that trained it."""
    from mezo_vllm.adapter import LoraAdapter
    from mezo_vllm.data import Split, load_task
    from mezo_vllm.evaluation import evaluate

    split = Split.make(load_task(cfg.task).test, engine.tokenizer, cfg.max_length, cfg.overflow)
    engine.load_master(LoraAdapter.load(adapter))
    engine.write_variants([(0, 0.0)])
    return evaluate(engine, split, 0)["accuracy"], len(split.by_example)


def _run_one(cfg: Any, engine: Any, engine_start_s: float, minutes: float, path: Path) -> str:
    """One sitting of one run; returns how it ended: done, stopped (budget) or diverged."""
    from mezo_vllm.trainer import MAX_NONFINITE_IN_A_ROW, TrainingStopped, tune

    run = Path(cfg.out)
    record = _load(path) or {"name": run.name, "config": _as_saved(cfg), "sittings": 0,
                             "engine_start_s": round(engine_start_s, 1)}
    record["sittings"] += 1
    _save(path, record)
    budget = _Budget(engine, minutes * 60)
    try:
        tune(cfg, resume=(run / "config.json").exists(), engine=budget)
    except TrainingStopped:
        if budget.reached:
            return "stopped"
        last = _trajectory(run)[-MAX_NONFINITE_IN_A_ROW:]
        if len(last) < MAX_NONFINITE_IN_A_ROW or not all(r.get("skipped") for r in last):
            raise  # a Ctrl-C or a failed engine: the run resumes at the next `run`
        # the loss stayed non-finite: a result of the setting, not to be retried
        record.update(status="diverged", seed=cfg.seed, steps=cfg.steps, dev_curve=_dev_curve(run),
                      stopped_at=last[-1]["step"] + 1)
        _save(path, record)
        return "diverged"
    curve = _dev_curve(run)
    accuracy, examples = _test_accuracy(engine, cfg, run / "adapter")
    best_accuracy, _ = _test_accuracy(engine, cfg, run / "best")
    trajectory = _trajectory(run)
    record.update(status="done", seed=cfg.seed, steps=cfg.steps, dev_curve=curve,
                  dev_final=curve[-1]["accuracy"], dev_best=max(c["accuracy"] for c in curve),
                  train_wall_s=curve[-1]["wall_s"], wall_s=round(curve[-1]["wall_s"] + record["engine_start_s"], 1),
                  skipped_steps=sum(bool(r.get("skipped")) for r in trajectory),
                  test_accuracy=accuracy, test_accuracy_best=best_accuracy, test_examples=examples,
                  machine=_machine())
    _save(path, record)
    return "done"


def _trajectory(run: Path) -> list[dict[str, Any]]:
    path = run / "trajectory.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _machine() -> str:
    """The CPU model and the cores this process may use: wall times compare on one machine kind."""
    import os

    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores"


def _pending(settings: Iterable[Setting], seeds: Sequence[int], root: Path, steps: int | None) -> list[tuple[Setting, int]]:
    """The runs still to do; a result written with other settings than the grid's is refused (a
    setting newer than the result file counts as what the run did: its default then)."""
    from mezo_vllm.config import UNTIL_ADDED, TuneConfig

    defaults = {**_as_saved(TuneConfig(out="")), **UNTIL_ADDED}
    todo = []
    for setting in settings:
        for seed in seeds:
            cfg = config(setting, seed, root, steps)
            cfg.validate()
            record = _load(root / f"{run_name(setting, seed)}.json")
            changed = sorted(k for k, v in _as_saved(cfg).items()
                             if record and record["config"].get(k, defaults.get(k)) != v)
            if changed:
                raise click.ClickException(f"{root}/{run_name(setting, seed)}.json was run with other "
                                           f"settings ({', '.join(changed)}): use another --root or delete it")
            if not record or record.get("status") not in ("done", "diverged"):
                todo.append((setting, seed))
    return todo


@click.group()
def main() -> None:
    """The issue-12 grid on SST-2: run it, list it, report it."""


@main.command()
@click.option("--setting", "patterns", multiple=True, help="settings to run (shell globs; default: all)")
@click.option("--seeds", default=",".join(map(str, SEEDS)), show_default=True, help="comma-separated seeds")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="wall time of one sitting of a run; a run stopped by it resumes at the next `run`")
@click.option("--steps", type=click.IntRange(min=1), help="replace every setting's steps (a smoke run; use another --root)")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=ROOT, show_default=True)
def run(patterns: Sequence[str], seeds: str, minutes: float, steps: int | None, root: Path) -> None:
    """Every run of the chosen settings not done yet: one child process per engine shape."""
    from mezo_vllm.settings import ConfigError

    settings = _settings(patterns)
    native, seen = native_bf16()
    if not native and any(s.overrides.get("dtype") == "bfloat16" for s in settings):
        click.echo(f"skipping the bf16 settings: this CPU has no native bf16 ({seen}); a bf16 engine here "
                   f"is emulated, ~9x slower than fp32, and would measure the emulation")
        settings = [s for s in settings if s.overrides.get("dtype") != "bfloat16"]
    try:
        todo = _pending(settings, _integers(seeds), root, steps)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    root.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple, list[str]] = {}
    for setting, seed in todo:
        groups.setdefault(_engine_key(config(setting, seed, root, steps)), []).append(run_name(setting, seed))
    click.echo(f"{len(todo)} runs to do in {len(groups)} engine shapes")
    failed = []
    for key, names in groups.items():
        command = [sys.executable, __file__, "sitting", "--root", str(root), "--minutes", str(minutes),
                   *(["--steps", str(steps)] if steps else []), *names]
        if subprocess.run(command).returncode:
            failed.append(f"{key}: {', '.join(names)}")
    if failed:
        raise click.ClickException("these groups failed (their runs resume at the next `run`): " + "; ".join(failed))


@main.command(hidden=True)
@click.argument("names", nargs=-1, required=True)
@click.option("--root", type=click.Path(path_type=Path), required=True)
@click.option("--minutes", type=float, required=True)
@click.option("--steps", type=int)
def sitting(names: Sequence[str], root: Path, minutes: float, steps: int | None) -> None:
    """One sitting of runs that share an engine shape, on one engine started as `tune` starts it."""
    from mezo_vllm.adapter import LoraAdapter
    from mezo_vllm.preflight import prepare
    from mezo_vllm.trainer import start_engine

    configs = []
    for name in names:
        setting, seed = name.rsplit("-s", 1)
        configs.append(config(BY_NAME[setting], int(seed), root, steps))
    first = configs[0]
    p = prepare(first, resume=(Path(first.out) / "config.json").exists())
    t0 = time.perf_counter()
    engine = start_engine(p.cfg, p.model_dir, LoraAdapter.init(p.spec, p.shapes, first.seed))
    engine_start_s = time.perf_counter() - t0
    for cfg in configs:
        ended = _run_one(cfg, engine, engine_start_s, minutes, root / f"{Path(cfg.out).name}.json")
        click.echo(f"{Path(cfg.out).name}: {ended}")


@main.command("list")
@click.option("--root", type=click.Path(path_type=Path), default=ROOT, show_default=True)
def list_(root: Path) -> None:
    """The grid's settings, what each changes, and how many of its runs are done."""
    for s in GRID:
        records = _records(root, s)
        done = sum(r.get("status") in ("done", "diverged") for r in records)
        click.echo(f"{s.name:26} {s.axis:17} {done} done  {s.changes}")


# --------------------------------------------------------------------------- templates

TEMPLATES: dict[str, tuple[str, tuple[str, str]]] = {  # name → (prompt with {s}, (negative, positive))
    "mezo (task sst2-mezo)": ("{s} It was", (" terrible", " great")),
    "mezo, bad/good": ("{s} It was", (" bad", " good")),
    "review": ("Review: {s}\nSentiment:", (" negative", " positive")),
    "review, bad/good": ("Review: {s}\nSentiment:", (" bad", " good")),
    "movie review (task sst2)": ("Movie review: {s}\nSentiment:", (" negative", " positive")),
    "sentence": ("{s}\nSentiment:", (" negative", " positive")),
    "the movie was": ("Movie review: {s}\nThe movie was", (" bad", " good")),
    "overall": ("Review: {s}\nOverall, the review is", (" negative", " positive")),
    "question": ("Question: Is the following movie review positive or negative?\n{s}\nAnswer:",
                 (" negative", " positive")),
}


@main.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("docs/study/templates.json"),
              show_default=True)
def templates(out: Path) -> None:
    """Zero-shot accuracy of SST-2 prompt templates on the train and dev splits (seed 0), never
    on test: the prompt is a choice like the others. Transformers, fp32, the embedded model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mezo_vllm.data import load_task
    from mezo_vllm.model import resolve_model

    model_dir = str(resolve_model(None))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    splits = load_task("sst2-mezo", 0)
    reviews = [(e.prompt.removesuffix(" It was"), e.label) for e in splits.train.examples + splits.dev.examples]
    results = {}
    for name, (template, targets) in TEMPLATES.items():
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in targets]
        if any(len(i) != 1 for i in ids):
            raise click.ClickException(f"{name}: an option of more than one token ({ids})")
        correct = positive = 0
        for b in range(0, len(reviews), 32):
            batch = reviews[b:b + 32]
            enc = tokenizer([template.format(s=s) for s, _ in batch], return_tensors="pt", padding=True)
            with torch.no_grad():
                margin = model(**enc).logits[:, -1, [i[0] for i in ids]].diff(dim=-1)[:, 0]
            correct += sum(int(m > 0) == y for m, (_, y) in zip(margin.tolist(), batch))
            positive += int((margin > 0).sum())
        results[name] = dict(template=template, targets=list(targets), accuracy=correct / len(reviews),
                             answers_positive=positive / len(reviews), examples=len(reviews))
        click.echo(f"{name:26} zero-shot accuracy {correct / len(reviews):.3f}, "
                   f"answers positive {positive / len(reviews):.2f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _save(out, results)
    click.echo(f"wrote {out}")


# --------------------------------------------------------------------------- tail averaging

def tail_average(run: Path, window: int):
    """The mean of a finished run's last `window` adapters θ_{T−K+1} … θ_T (Polyak-Ruppert tail
    averaging), from its final adapter and trajectory alone: step i moves θ_i to θ_{i+1} by u_i, so
    the mean is θ_T − Σᵢ max(0, i − T + K)/K · u_i. Each u_i is rebuilt by the run's own update
    rule from the step's logged seeds, g's and lr, in order, as a resumed run rebuilds its state
    (the normaliser's window, momentum's), so no iterate needs to have been kept."""
    from mezo_vllm.adapter import LoraAdapter, Update
    from mezo_vllm.config import TuneConfig
    from mezo_vllm.estimator import finite_steps, step_grads
    from mezo_vllm.trainer import estimator_for

    cfg = TuneConfig.from_json(json.loads((run / "config.json").read_text()))
    if cfg.weight_decay:
        raise click.ClickException(f"{run}: --weight-decay {cfg.weight_decay}: the mean is only a sum of updates without decay")
    estimator, terms = estimator_for(cfg), []
    for record in finite_steps(_trajectory(run)):
        seeds, grads = step_grads(record)
        update = estimator.update(estimator.directions(record["step"], seeds), grads, record["lr"])
        weight = max(0, record["step"] - cfg.steps + window) / window
        terms += [(direction, -weight * coeff) for direction, coeff in update.terms if weight]
    mean = LoraAdapter.load(run / "adapter")
    mean.apply(Update(tuple(terms)))
    return mean


@main.command("tail-average")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--windows", default="50,100,150", show_default=True, help="comma-separated K: the last K adapters averaged")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("docs/study/tail-average.json"),
              show_default=True)
def tail_average_command(runs: Sequence[Path], windows: str, out: Path) -> None:
    """Dev accuracy of finished runs' final adapters against the mean of their last K adapters
    (dev only: whether to average is a choice like the others), on one engine of the first run's
    shape."""
    from mezo_vllm.adapter import LoraAdapter
    from mezo_vllm.config import TuneConfig
    from mezo_vllm.data import Split, load_task
    from mezo_vllm.evaluation import evaluate
    from mezo_vllm.model import resolve_model
    from mezo_vllm.trainer import start_engine

    first = TuneConfig.from_json(json.loads((runs[0] / "config.json").read_text()))
    engine = start_engine(first, str(resolve_model(first.model)), LoraAdapter.load(runs[0] / "adapter"))
    dev = Split.make(load_task(first.task).dev, engine.tokenizer, first.max_length, first.overflow)

    def accuracy(adapter: Any) -> float:
        engine.load_master(adapter)
        engine.write_variants([(0, 0.0)])
        return evaluate(engine, dev, 0)["accuracy"]

    results = {}
    for run in runs:
        row = {"final": accuracy(LoraAdapter.load(run / "adapter"))}
        row.update({f"mean of last {k}": accuracy(tail_average(run, k)) for k in _integers(windows)})
        results[run.name] = row
        click.echo(f"{run.name}: " + ", ".join(f"{key} {value:.2f}" for key, value in row.items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    _save(out, {"split": f"{first.task} dev ({len(dev.by_example)} examples)", "machine": _machine(), "runs": results})
    click.echo(f"wrote {out}")


# --------------------------------------------------------------------------- report

@dataclass
class Row:
    setting: Setting
    runs: list[dict[str, Any]]  # done
    diverged: int

    def stat(self, key: str) -> tuple[float, float]:
        """Mean and std over the seeds (nan, nan where no run has the figure: older result files)."""
        values = [r[key] for r in self.runs if key in r]
        if not values:
            return math.nan, math.nan
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
        return mean, std


def rows(root: Path) -> list[Row]:
    out = []
    for s in GRID:
        records = _records(root, s)
        done = [r for r in records if r.get("status") == "done"]
        diverged = sum(r.get("status") == "diverged" for r in records)
        if done or diverged:
            out.append(Row(s, done, diverged))
    return sorted(out, key=lambda r: -r.stat("dev_final")[0] if r.runs else math.inf)


def _pm(mean: float, std: float, scale: float = 100.0) -> str:
    if mean != mean:
        return "—"
    return f"{mean * scale:.1f} ± {std * scale:.1f}" if std == std else f"{mean * scale:.1f}"


def table(found: list[Row]) -> str:
    lines = ["| setting | axis | changes | seeds | steps | dev accuracy (final) | test accuracy (final) | "
             "test accuracy (best/: the best dev step's) | wall time (min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in found:
        changes = row.setting.changes
        seeds = f"{len(row.runs)}" + (f" (+{row.diverged} diverged)" if row.diverged else "")
        if not row.runs:
            lines.append(f"| {row.setting.name} | {row.setting.axis} | {changes} | {seeds} | — | — | — | — | — |")
            continue
        wall = row.stat("wall_s")
        lines.append(f"| {row.setting.name} | {row.setting.axis} | {changes} | {seeds} | {row.runs[0]['steps']} | "
                     f"{_pm(*row.stat('dev_final'))} | {_pm(*row.stat('test_accuracy'))} | "
                     f"{_pm(*row.stat('test_accuracy_best'))} | "
                     f"{_pm(*wall, scale=1 / 60)} |")
    return "\n".join(lines)


def first_order_results(folder: Path) -> list[dict[str, Any]]:
    """`examples/quality.py first-order --task sst2 [--seed S]` results scored on test (task sst2,
    this template), one per seed, as copied from runs/quality/results/ into the report's root."""
    found = [json.loads(p.read_text()) for p in sorted(folder.glob("sst2-first-order*.json"))]
    return [r for r in found if "test" in r]


def plot(found: list[Row], dest: Path, first_order: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_dev) = plt.subplots(1, 2, figsize=(13, 5))
    for row in (r for r in found if r.runs):
        (acc, acc_std), (wall, wall_std) = row.stat("test_accuracy"), row.stat("wall_s")
        ax.errorbar(wall / 60, acc * 100, xerr=None if wall_std != wall_std else wall_std / 60,
                    yerr=None if acc_std != acc_std else acc_std * 100, fmt="o", capsize=3,
                    color="black" if row.setting.name == "base" else None)
        ax.annotate(row.setting.name, (wall / 60, acc * 100), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if first_order:
        tests = [r["test"] * 100 for r in first_order]
        mean, minutes = sum(tests) / len(tests), sum(r["train_s"] for r in first_order) / len(first_order) / 60
        ax.axhline(mean, linestyle="--", color="grey",
                   label=f"first-order LoRA, task sst2 ({len(tests)} seeds, {minutes:.1f} min, examples/quality.py)")
        ax.legend(loc="lower right")
    ax.set(xlabel="wall time (min: training + one engine start)", ylabel="SST-2 test accuracy (%, mean ± std)",
           title="settings of the study (choices are made on dev)")
    top = [r for r in found if r.runs][:6]
    for row in top:
        curve = row.runs[0]["dev_curve"]
        ax_dev.plot([c["wall_s"] / 60 for c in curve], [c["accuracy"] * 100 for c in curve], marker=".",
                    label=f"{row.setting.name} (seed {row.runs[0]['seed']})")
    ax_dev.set(xlabel="training wall time (min)", ylabel="SST-2 dev accuracy (%)",
               title="dev curves of the best settings on dev")
    if top:
        ax_dev.legend(fontsize=8)
    for a in (ax, ax_dev):
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


@main.command()
@click.option("--root", type=click.Path(path_type=Path), default=ROOT, show_default=True)
def report(root: Path) -> None:
    """`<root>/table.md` (settings by mean final dev accuracy, test accuracy beside it) and
    `<root>/study.png` (test accuracy against wall time; dev curves of the best on dev)."""
    found = rows(root)
    if not found:
        raise click.ClickException(f"no finished run in {root} yet (`study.py run` first)")
    text = table(found)
    (root / "table.md").write_text(text + "\n")
    plot(found, root / "study.png", first_order_results(root))
    few = [r.setting.name for r in found if len(r.runs) < 3]
    click.echo(text)
    if few:
        click.echo(f"fewer than 3 seeds so far: {', '.join(few)}")
    click.echo(f"wrote {root}/table.md and {root}/study.png")


if __name__ == "__main__":
    main()
