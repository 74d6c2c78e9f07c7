"""The MeZO step loop: batches, seeded variants, one engine call per step, logs, eval, checkpoints.

A run is a folder (`rundir.py`): `config.json`, `trajectory.jsonl` (one line per step: enough to
replay it), `metrics.jsonl` (train and dev lines), `checkpoint/` (adapter + step, written
atomically), `engine.log` (what vLLM and torch print, `console.py`), and what `outputs.py`
publishes: `best/`, `adapter/` (PEFT format), `summary.json`, `curves.png`. `tune` is three
parts: `prepare` (`preflight.py`: every check, before anything is written or the engine starts), the resume
state (`_Progress`), and the loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from safetensors import SafetensorError
from tqdm import tqdm

from . import console, objective, rundir
from .adapter import (
    Direction,
    LoraAdapter,
    Update,
)
from .config import TuneConfig
from .data import (
    Request,
    Split,
    save_records,
)
from .data.types import held_warnings
from .errors import EngineStartError
from .estimator import Estimator, learning_rate, make_estimator, variant_slots
from .evaluation import evaluate, generation_scores
from .outputs import RunOutputs, dev_lines, format_summary
from .preflight import (
    IN_MEMORY,
    Prepared,
    in_memory,
    is_a_run,
    note_schedule_change,
    prepare,
)

MAX_NONFINITE_IN_A_ROW = 5


class TrainingStopped(Exception):
    """The run stopped early but cleanly (interrupt, diverged): a checkpoint is on disk."""


class EngineFailed(TrainingStopped):
    """An engine call raised mid-run (the engine, a worker or a replica is gone): the run stops
    with its last checkpoint and every log line written so far intact."""


class DiskFull(TrainingStopped):
    """A save or a log append found no space left: the last checkpoint is intact (saves are
    written beside it and renamed in), and a torn log line is dropped on resume."""


class _WatchedEngine:
    """The run's engine, with any exception from an engine call turned into EngineFailed, naming
    the step, the cause and how to resume. Only calls into the engine are watched: a bug in the
    loop itself keeps its own exception and traceback."""

    _CALLS = frozenset({"write_variants", "score", "generate", "apply_update", "master", "load_master"})

    def __init__(self, engine: ScoringEngine, run: Path, steps_done: int):
        self._engine, self._run = engine, run
        self.steps_done = steps_done  # kept up to date by the loop, for the message

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._engine, name)
        if name not in self._CALLS:
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return value(*args, **kwargs)
            except Exception as e:
                raise EngineFailed(self._message(name, e)) from e

        return call

    def _message(self, call: str, error: Exception) -> str:
        cause = (f"{type(error).__name__}: {error}" if str(error) else type(error).__name__).splitlines()[0]
        done = f"{self.steps_done} step{'' if self.steps_done == 1 else 's'}"
        return (f"the engine failed after {done} ({call}: {cause[:300]}); {_kept(self._run)}; "
                f"continue with: mezo-vllm tune --resume {self._run}")


def _kept(run: Path) -> str:
    """What a stopped run leaves to resume from."""
    state = run / rundir.CHECKPOINT / "state.json"
    try:
        return f"the last checkpoint (step {json.loads(state.read_text())['step']}) is intact"
    except (OSError, ValueError, KeyError, TypeError):
        return "no checkpoint was written yet (a resumed run starts from step 0)"


class _StopOnSigint:
    """Ctrl-C finishes the current step, then the loop checkpoints and stops: nothing is lost."""

    def __init__(self) -> None:
        self.requested = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        self.requested = True
        console.say("interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self) -> "_StopOnSigint":
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self._previous)


class ScoringEngine(Protocol):
    """What the loop needs of an engine (vLLM, or the transformers reference)."""

    tokenizer: Any
    max_model_len: int

    def write_variants(self, writes: Sequence[tuple[Direction, float]]) -> None: ...
    def score(self, requests: Sequence[Request], variants: Sequence[int | None]) -> np.ndarray: ...
    def generate(self, contexts: Sequence[Sequence[int]], max_tokens: int,
                 variants: Sequence[int | None]) -> list[list[str]]: ...
    def apply_update(self, update: Update) -> None: ...
    def master(self) -> dict: ...
    def load_master(self, adapter: LoraAdapter) -> None: ...


def batch_loss(split: Split, requests: Sequence[Request], sums: np.ndarray) -> np.ndarray:
    """The batch loss of each row of `sums` ([variants, columns] from `engine.score`)."""
    return objective.batch_loss(split.dataset.examples, split.dataset.kind, requests, sums).numpy()


@dataclass(frozen=True)
class StepResult:
    losses: list[float]  # of the estimator's variants, in order (ZO-SGD: L(θ+εz), L(θ−εz) per direction)
    grads: list[float]  # the estimate g of each direction

    @property
    def finite(self) -> bool:
        """A NaN/Inf g would poison θ: such a step is skipped."""
        return all(math.isfinite(g) for g in self.grads)


def mezo_step(engine: ScoringEngine, split: Split, requests: Sequence[Request], directions: Sequence[Direction],
              eps: float, estimator: Estimator, lr: float, objective_name: str = "loss") -> StepResult:
    """One MeZO step: the estimator's variants (±εz pairs, or θ and θ+εzᵢ) in their slots, one
    engine call, g, a seeded update.

    objective "loss": the batch loss from scored log-probs; "f1": −F1 of each variant's greedy
    answers (MeZO's non-differentiable objective), all variants generated in one call.
    """
    writes = estimator.variants(directions, eps)
    engine.write_variants(writes)
    variants = list(range(len(writes)))
    if objective_name == "f1":
        f1, _ = generation_scores(engine, split, list(dict.fromkeys(r.example for r in requests)), variants)
        losses = [-float(row.mean()) for row in f1]
    else:
        losses = batch_loss(split, requests, engine.score(requests, variants)).tolist()
    grads = estimator.estimates(losses, eps)
    result = StepResult(losses, grads)
    if result.finite:
        engine.apply_update(estimator.update(directions, grads, lr))
    return result


DIRECTIONS_PER_SEED_BLOCK = 64


def step_seed(run_seed: int, step: int, direction: int) -> int:
    """The seed of a step's direction: a function of (run seed, step, direction) only. The first
    64 directions of a step keep the formula of earlier versions (their runs resume exactly);
    further ones come from a hash, above 2**62, so they repeat no other step's seed."""
    if direction < DIRECTIONS_PER_SEED_BLOCK:
        return (run_seed * 1_000_003 + step) * DIRECTIONS_PER_SEED_BLOCK + direction
    digest = hashlib.blake2b(f"direction:{run_seed}:{step}:{direction}".encode(), digest_size=8).digest()
    return (1 << 62) | (int.from_bytes(digest, "little") & ((1 << 62) - 1))


def batch_examples(run_seed: int, step: int, examples: Sequence[int], size: int) -> list[int]:
    """A function of (seed, step) only, so a resumed run sees exactly the batches it would have."""
    rng = np.random.default_rng([run_seed, step])
    return [examples[i] for i in rng.choice(len(examples), size=min(size, len(examples)), replace=False)]


def start_engine(cfg: TuneConfig, model_dir: str, adapter: LoraAdapter) -> ScoringEngine:
    """The engine a run's settings ask for, holding `adapter` as its master copy. "auto" is
    resolved here too, not only in pre-flight: a caller may start an engine without it."""
    from .platform_policy import engine_dtype

    dtype = engine_dtype(cfg.dtype, cfg.engine)
    if cfg.engine == "reference":
        from .reference import ReferenceEngine

        return ReferenceEngine(model_dir, adapter, dtype=dtype, max_model_len=cfg.max_length,
                               trust_remote_code=cfg.trust_remote_code)
    from .engine import EngineConfig, VllmEngine

    config = EngineConfig(model=model_dir, dtype=dtype, max_model_len=cfg.max_length,
                          n_variants=variant_slots(cfg.estimator, cfg.directions), seed=cfg.seed, fast=cfg.fast, compile=cfg.compile,
                          trust_remote_code=cfg.trust_remote_code,
                          tensor_parallel_size=cfg.tensor_parallel_size,
                          pipeline_parallel_size=cfg.pipeline_parallel_size)
    if cfg.replicas > 1 or cfg.ray_address is not None:
        from .replicas import ReplicatedEngine

        return ReplicatedEngine(config, adapter, cfg.replicas, cfg.ray_address)
    return VllmEngine(config, adapter)


# --------------------------------------------------------------------------- resume state

@dataclass
class _Progress:
    """Where a (resumed) run stands, from its logs."""

    taken: list[dict]  # trajectory lines of the steps done
    metrics: list[dict]  # dev lines so far
    wall0: float  # seconds of earlier sittings, engine starts included

    @classmethod
    def read(cls, run: Path) -> "_Progress":
        metrics = dev_lines(rundir.read_log(run / "metrics.jsonl")[0])
        # a sitting's time after its last evaluation is not counted: accuracy-vs-time plots
        wall0 = max((m.get("wall_s", 0.0) for m in metrics), default=0.0)
        return cls(rundir.read_log(run / "trajectory.jsonl")[0], metrics, wall0)

    @property
    def skipped(self) -> int:
        return sum(bool(r.get("skipped")) for r in self.taken)

    @property
    def skipped_in_a_row(self) -> int:
        return next((i for i, r in enumerate(reversed(self.taken)) if not r.get("skipped")), len(self.taken))

    def metrics_at(self, step: int) -> dict | None:
        return next((m for m in self.metrics if m["step"] == step), None)


# --------------------------------------------------------------------------- the run

def tune(cfg: TuneConfig, resume: bool = False, overwrite: bool = False, engine: ScoringEngine | None = None,
         verbose: bool = False, data: Sequence[Any] | None = None,
         eval_data: Sequence[Any] | None = None) -> dict[str, Any]:
    """Run (or continue) MeZO-LoRA training; returns the summary printed at the end: the keys of
    `summary.json`, the run folder (`run`) and the first and last dev metrics (`before`, `after`).

    `engine`: an already running engine of the same model (tests, sweeps), given the run's
    adapter with `load_master`; by default a vLLM engine is started for the run. `verbose`:
    vLLM's and torch's output on the terminal instead of in RUN/engine.log. `data`, `eval_data`:
    records in memory (the dicts a data file's lines hold) in place of the --data/--eval-data
    files, validated as a file is (errors name `data[i]`); they are saved as RUN/data.jsonl and
    RUN/eval_data.jsonl, which the run's config.json names.
    """
    started = time.perf_counter()
    records = {"data": data, "eval_data": eval_data}
    cfg = in_memory(cfg, records)
    run = Path(cfg.out)
    with contextlib.ExitStack() as stack:
        claimed = is_a_run(run)  # locked before prepare tidies its checkpoint
        if claimed:
            stack.enter_context(rundir.locked(run))
        with held_warnings():  # said once every check has passed
            p = prepare(cfg, resume, overwrite, records)
        if not claimed:
            run.mkdir(parents=True, exist_ok=True)
            stack.enter_context(rundir.locked(run))
        if overwrite and not resume:
            rundir.clear(run)  # before the new run's log opens in it, or it is removed with the old run's files
        try:
            stack.enter_context(console.quiet(run / "engine.log", verbose))
            summary = _run(p, resume, engine, verbose, started, records)
        except (OSError, SafetensorError) as e:
            if not rundir.disk_full(e):
                raise
            writing = f" (writing {e.filename})" if getattr(e, "filename", None) else ""
            raise DiskFull(f"no space left on the device of {run}{writing}; {_kept(run)}; "
                           f"free some space, then continue with: mezo-vllm tune --resume {run}") from e
    return summary


def _run(p: Prepared, resume: bool, engine: ScoringEngine | None, verbose: bool,
         started: float, records: dict[str, Sequence[Any] | None]) -> dict[str, Any]:
    """`tune` once the run folder is this process's."""
    cfg, run = p.cfg, p.run
    note_schedule_change(p)
    for name, given in records.items():
        if given is not None:
            save_records(run / IN_MEMORY[name], given)
    rundir.write_file(run / "config.json", json.dumps(cfg.to_json(), indent=2) + "\n")
    adapter, start = p.checkpoint if p.checkpoint else (p.init or LoraAdapter.init(p.spec, p.shapes, cfg.seed), 0)
    rundir.truncate_jsonl(run / "trajectory.jsonl", lambda r: r["step"] < start)  # step = the step taken
    rundir.truncate_jsonl(run / "metrics.jsonl", lambda r: 0 < start and r["step"] <= start)  # steps done
    progress = _Progress.read(run)
    out = RunOutputs(cfg, p.spec, p.model_dir, start, resume, p.best)
    try:
        if engine is None:
            engine = _start_engine(p, adapter, verbose)
        else:
            engine.load_master(adapter)
        engine = _WatchedEngine(engine, run, start)
        train = Split.make(p.train, engine.tokenizer, cfg.max_length, cfg.overflow)
        dev = Split.make(p.dev, engine.tokenizer, cfg.max_length, cfg.overflow) if p.dev else None
        if dev is not None and cfg.eval_examples:
            dev = dev.first(cfg.eval_examples)

        def dev_metrics(step: int, skipped: int = 0) -> dict[str, float]:
            engine.write_variants([(0, 0.0)])
            metrics = {"step": step, **evaluate(engine, dev, 0), "skipped_steps": skipped,
                       "wall_s": round(progress.wall0 + time.perf_counter() - started, 1)}
            out.evaluated(metrics, engine.master)
            console.say(f"step {step}: dev " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                        if k not in ("step", "skipped_steps", "wall_s")))
            return metrics

        first = dev_metrics(0) if dev is not None and start == 0 else progress.metrics_at(0)
        skipped = _loop(cfg, p, engine, train, progress, start, dev_metrics if dev is not None else None, out)

        final = LoraAdapter(p.spec, engine.master())
        # metrics first: a checkpoint at the last step then always has its metrics line; a run
        # resumed when already finished has it already
        last = progress.metrics_at(cfg.steps) if start == cfg.steps else None
        if dev is not None and last is None:
            last = dev_metrics(cfg.steps, skipped)
        out.checkpoint(final, cfg.steps, scheduled=True)
        summary = out.finish(final, first, last, progress.wall0 + time.perf_counter() - started)
        from .plots import plot_curves

        plot_curves(run)
    finally:
        out.close()
    for line in format_summary(summary, run):
        console.say(line)
    return {**summary, "run": str(run), "before": first, "after": last}


def _start_engine(p: Prepared, adapter: LoraAdapter, verbose: bool) -> ScoringEngine:
    """The run's engine; a start-up failure names where vLLM's own lines are."""
    log = "" if verbose else f"; vLLM's log: {p.run / 'engine.log'}"
    console.say(f"starting the engine on {p.model_dir}{log}")
    t0 = time.perf_counter()
    try:
        engine = start_engine(p.cfg, p.model_dir, adapter)
    except EngineStartError as e:
        raise EngineStartError(f"{e}{log}") from e.__cause__
    console.say(f"engine ready in {time.perf_counter() - t0:.0f} s")
    return engine


def estimator_for(cfg: TuneConfig) -> Estimator:
    """The update rule a run's settings describe."""
    return make_estimator(cfg.estimator, cfg.weight_decay, cfg.momentum, cfg.momentum_window, cfg.lozo_rank,
                          cfg.lozo_period, cfg.seed, cfg.sparsity, cfg.train_only == "B", cfg.normalise)


def _loop(cfg: TuneConfig, p: Prepared, engine: Any, train: Split, progress: _Progress, start: int,
          dev_metrics: Any, out: RunOutputs) -> int:
    """The steps from `start` to `cfg.steps`; returns the count of skipped (non-finite) steps."""
    estimator = estimator_for(cfg)
    estimator.restore(progress.taken)  # e.g. momentum's window of recent (seed, g)
    examples = sorted(train.by_example)
    skipped, in_a_row = progress.skipped, progress.skipped_in_a_row
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="MeZO", unit="step",
               file=console.stream())
    with _StopOnSigint() as sigint:
        for step in bar:
            engine.steps_done = step
            t0 = time.perf_counter()
            requests = train.requests_of(batch_examples(cfg.seed, step, examples, cfg.batch_size))
            seeds = [step_seed(cfg.seed, step, k) for k in range(cfg.directions)]
            lr = learning_rate(cfg.lr, cfg.lr_schedule, step, cfg.steps, cfg.warmup_steps)
            result = mezo_step(engine, train, requests, estimator.directions(step, seeds), cfg.eps,
                               estimator, lr, cfg.objective)
            record = {"step": step, "seed": seeds[0], "g": result.grads[0],
                      **estimator.loss_record(result.losses), "lr": lr}
            if cfg.directions > 1:
                record.update(seeds=seeds, grads=result.grads)
            skipped, in_a_row = skipped + (not result.finite), 0 if result.finite else in_a_row + 1
            if not result.finite:
                record["skipped"] = True
            rundir.append_jsonl(p.run / "trajectory.jsonl", record)
            done = engine.steps_done = step + 1
            tokens = sum(len(r.token_ids) for r in requests) * len(result.losses)
            bar.set_postfix({**out.trained(done, result.losses, result.grads, lr),
                             "tok/s": f"{tokens / (time.perf_counter() - t0):.0f}"})
            if dev_metrics and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                dev_metrics(done, skipped)  # before a stop, so a resumed run's metrics miss none
            if in_a_row >= MAX_NONFINITE_IN_A_ROW or sigint.requested:
                out.checkpoint(LoraAdapter(p.spec, engine.master()), done, scheduled=False)
                why = (f"{in_a_row} steps in a row had a non-finite loss (try a smaller --lr or --eps)"
                       if in_a_row >= MAX_NONFINITE_IN_A_ROW else "interrupted")
                raise TrainingStopped(f"{why}: stopped after step {done}, checkpoint saved; "
                                      f"continue with: mezo-vllm tune --resume {p.run}")
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:  # the last: by tune
                out.checkpoint(LoraAdapter(p.spec, engine.master()), done, scheduled=True)
    bar.close()
    return skipped
