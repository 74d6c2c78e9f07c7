"""The MeZO step loop: batches, seeded variants, one engine call per step, logs, eval, checkpoints.

A run is a folder: `config.json`, `trajectory.jsonl` (one line per step: enough to replay it),
`metrics.jsonl` (dev metric over steps), `checkpoint/` (adapter + step, written atomically),
and at the end `adapter/` (PEFT format) and `curves.png`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from safetensors import SafetensorError

from .adapter import AdapterError, Direction, LoraAdapter, LoraSpec, Update, model_linear_shapes, resolve_targets
from .config import ConfigError, TuneConfig
from .data import (CLASSIFICATION, Dataset, Request, accuracy, exact_match, example_losses, load_file, load_task,
                   squad_f1, tokenize)
from .estimator import Estimator, learning_rate, make_estimator, projected_gradient
from .model import ModelError, resolve_model
from .recipe import read_saved_config


MAX_NONFINITE_IN_A_ROW = 5


class TrainingStopped(Exception):
    """The run stopped early but cleanly (interrupt, diverged): a checkpoint is on disk."""


class EngineFailed(TrainingStopped):
    """An engine call raised mid-run (the engine, a worker or a replica is gone): the run stops
    with its last checkpoint and every log line written so far intact."""


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
        state = self._run / "checkpoint" / "state.json"
        try:
            kept = f"the last checkpoint (step {json.loads(state.read_text())['step']}) is intact"
        except (OSError, ValueError, KeyError, TypeError):
            kept = "no checkpoint was written yet (a resumed run starts from step 0)"
        done = f"{self.steps_done} step{'' if self.steps_done == 1 else 's'}"
        return (f"the engine failed after {done} ({call}: {cause[:300]}); {kept}; "
                f"continue with: mezo-vllm tune --resume {self._run}")


class _StopOnSigint:
    """Ctrl-C finishes the current step, then the loop checkpoints and stops: nothing is lost."""

    def __init__(self) -> None:
        self.requested = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

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


@dataclass
class Split:
    """A dataset with its requests, tokenized once for the whole run."""

    dataset: Dataset
    requests: list[Request]
    by_example: dict[int, list[Request]]

    @classmethod
    def make(cls, dataset: Dataset, tokenizer: Any, max_len: int, overflow: str) -> "Split":
        requests, report = tokenize(dataset.examples, tokenizer, max_len, overflow)
        if report.truncated or report.rejected:
            tqdm.write(f"{dataset.name}: {report.truncated} examples truncated from the left, "
                       f"{report.rejected} rejected (longer than {max_len} tokens)")
        by_example: dict[int, list[Request]] = {}
        for r in requests:
            by_example.setdefault(r.example, []).append(r)
        if not by_example:
            raise ConfigError(f"{dataset.name}: no example fits in {max_len} tokens")
        return cls(dataset, requests, by_example)

    def requests_of(self, examples: Sequence[int]) -> list[Request]:
        return [r for i in examples for r in self.by_example[i]]


def batch_loss(split: Split, requests: Sequence[Request], sums: np.ndarray) -> float:
    counts = [len(r.token_ids) - r.span_start for r in requests]
    losses = example_losses(split.dataset.examples, split.dataset.kind, requests, sums.tolist(), counts)
    return float(np.mean(losses))


# Greedy answers of generation tasks stop at a newline (the targets end with one) or after this
# many tokens; SQuAD/DROP answers are a few words.
MAX_ANSWER_TOKENS = 32


def _references(split: Split, example: int) -> tuple[str, ...]:
    """What a generated answer is scored against: the task's answers, else the completion."""
    e = split.dataset.examples[example]
    return e.answers or (e.targets[0].strip(),)


def generation_scores(engine: ScoringEngine, split: Split, examples: Sequence[int],
                      variants: Sequence[int | None]) -> tuple[np.ndarray, np.ndarray]:
    """F1 and exact match [variant, example] of greedy answers, every variant in one engine call;
    the context is the request's own (already truncated) token ids, so it is what was scored."""
    contexts = [split.by_example[i][0].token_ids[: split.by_example[i][0].span_start] for i in examples]
    texts = engine.generate(contexts, MAX_ANSWER_TOKENS, list(variants))
    f1 = np.array([[squad_f1(t, _references(split, i)) for t, i in zip(row, examples)] for row in texts])
    em = np.array([[exact_match(t, _references(split, i)) for t, i in zip(row, examples)] for row in texts])
    return f1, em


def evaluate(engine: ScoringEngine, split: Split, variant: int | None) -> dict[str, float]:
    """Accuracy for classification; mean per-token NLL for completion, and for question answering
    (examples with reference answers: SQuAD, DROP) F1 and exact match of greedy answers."""
    sums = engine.score(split.requests, [variant])[0]
    if split.dataset.kind == CLASSIFICATION:
        return {"accuracy": accuracy(split.dataset.examples, split.requests, sums.tolist())}
    metrics = {"nll": batch_loss(split, split.requests, sums)}
    examples = sorted(split.by_example)
    if hasattr(engine, "generate") and all(split.dataset.examples[i].answers for i in examples):
        f1, em = generation_scores(engine, split, examples, [variant])
        metrics.update(f1=float(f1.mean()), em=float(em.mean()))
    return metrics


def mezo_step(engine: ScoringEngine, split: Split, requests: Sequence[Request], seeds: Sequence[Direction],
              eps: float, estimator: Estimator, lr: float, objective: str = "loss"
              ) -> tuple[list[float], list[float]]:
    """One MeZO step: ±εz(seed) variants in their slots, one engine call, g, seeded update.

    objective "loss": the batch loss from scored log-probs; "f1": −F1 of each variant's greedy
    answers (MeZO's non-differentiable objective), all variants generated in one call.
    Returns the losses (+, − per direction) and the projected gradients g, one per direction;
    a non-finite g means the step was skipped.
    """
    engine.write_variants([(seed, sign * eps) for seed in seeds for sign in (1.0, -1.0)])
    variants = list(range(2 * len(seeds)))
    if objective == "f1":
        f1, _ = generation_scores(engine, split, list(dict.fromkeys(r.example for r in requests)), variants)
        losses = [-float(row.mean()) for row in f1]
    else:
        sums = engine.score(requests, variants)
        losses = [batch_loss(split, requests, row) for row in sums]
    grads = [projected_gradient(losses[2 * k], losses[2 * k + 1], eps) for k in range(len(seeds))]
    if all(math.isfinite(g) for g in grads):  # a NaN/Inf loss would poison θ: skip the step
        engine.apply_update(estimator.update(seeds, grads, lr))
    return losses, grads


def step_seed(run_seed: int, step: int, direction: int) -> int:
    return (run_seed * 1_000_003 + step) * 64 + direction


def batch_examples(run_seed: int, step: int, examples: Sequence[int], size: int) -> list[int]:
    """A function of (seed, step) only, so a resumed run sees exactly the batches it would have."""
    rng = np.random.default_rng([run_seed, step])
    return [examples[i] for i in rng.choice(len(examples), size=min(size, len(examples)), replace=False)]


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _log_record(line: str) -> dict | None:
    """A log line as a record with an integer step (what resuming reads), or None."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and type(record.get("step")) is int else None


def _read_log(path: Path) -> tuple[list[dict], bool]:
    """A run's log and whether its last line is torn (no newline, not JSON: the run was killed
    while writing it). A torn last line is always past the last checkpoint, which is written
    after its step's lines, so a resumed run drops it; a bad line anywhere else is refused."""
    if not path.exists():
        return [], False
    try:
        lines = path.read_text().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({type(e).__name__})") from None
    torn = bool(lines[-1].strip()) and _log_record(lines[-1]) is None
    records = []
    for number, line in enumerate(lines[:-1] if torn else lines, start=1):
        if not line.strip():
            continue
        record = _log_record(line)
        if record is None:
            raise ConfigError(f"{path}:{number}: not a JSON record with an integer step")
        records.append(record)
    return records, torn


_PREVIOUS = ".checkpoint-old"  # the previous checkpoint, for the moment the new one is renamed in


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Files and directory entries on disk before a rename publishes them."""
    for path in [*folder.rglob("*"), folder]:
        _fsync(path)


def _swap_in(tmp: Path, dest: Path) -> None:
    """dest ← tmp by renames only. Until the first rename dest is the old folder; between the
    two it waits whole under `.<name>-old`, where `_tidy_checkpoints` takes it back."""
    if dest.exists():
        trash = dest.parent / f".{dest.name}-old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(dest, trash)
        os.replace(tmp, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    _fsync(dest.parent)


def _tidy_checkpoints(run: Path) -> None:
    """What a save killed midway leaves: the previous checkpoint renamed aside (taken back) and
    half-written temporary folders (removed), so a resumed run sees one whole checkpoint."""
    current, previous = run / "checkpoint", run / _PREVIOUS
    if not current.exists() and (previous / "state.json").is_file():
        os.replace(previous, current)
    for stale in [*run.glob(".checkpoint-*"), *run.glob(".adapter-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def _write_whole(dest: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a temporary folder beside dest, which is synced and renamed in: a crash at
    any moment leaves either the old dest or the new one, whole."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide an adapter from a server run by another user
        write(tmp)
        _fsync_tree(tmp)
        _swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(run: Path, adapter: LoraAdapter, base_model: str, step: int) -> None:
    _tidy_checkpoints(run)

    def write(folder: Path) -> None:
        adapter.save(folder / "adapter", base_model)
        (folder / "state.json").write_text(json.dumps({"step": step}) + "\n")

    _write_whole(run / "checkpoint", write)


def load_checkpoint(run: Path) -> tuple[LoraAdapter, int] | None:
    _tidy_checkpoints(run)
    folder = run / "checkpoint"
    if not (folder / "state.json").exists():
        return None
    step = int(json.loads((folder / "state.json").read_text())["step"])
    return LoraAdapter.load(folder / "adapter"), step


def _truncate_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    """Drop what a killed run logged after its last checkpoint: a resumed run logs it again.
    The file is replaced by a rename, so a kill now loses none of the lines kept."""
    records, torn = _read_log(path)
    kept = [r for r in records if keep(r)]
    if torn:
        tqdm.write(f"{path}: dropped its torn last line (the run was killed while writing it)")
    if torn or len(kept) < len(records):
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def load_splits(cfg: TuneConfig) -> tuple[Dataset, Dataset | None]:
    if cfg.task is not None:
        splits = load_task(cfg.task)
        return splits.train, splits.dev
    train = load_file(cfg.data)
    dev = load_file(cfg.eval_data) if cfg.eval_data else None
    if dev is not None and dev.kind != train.kind:
        raise ConfigError(f"{cfg.eval_data} is {dev.kind} data but {cfg.data} is {train.kind}")
    return train, dev


def _check_out(run: Path, resume: bool, overwrite: bool) -> None:
    """The run folder: free (or to be continued or replaced), a folder, and writable."""
    if run.exists() and not run.is_dir():
        raise ConfigError(f"--out {run}: exists and is not a folder")
    if run.exists() and any(run.iterdir()) and not (resume or overwrite):
        raise ConfigError(f"{run} exists: pass --resume to continue it or --overwrite to replace it")
    parent = run.absolute()
    while not parent.exists() and not parent.is_symlink():  # the nearest thing that exists
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {run}: {parent} is a file, not a folder, so {run} cannot be created")
    # to create (or replace) `run` its parent must be writable; to write into it, `run` itself
    where = run.parent if overwrite and parent == run.absolute() else parent
    for folder in dict.fromkeys((parent, where)):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {run}: {folder} is not writable")


def _refuse_unless_a_run(folder: Path) -> None:
    """--overwrite deletes a folder: only one a run wrote (its config.json reads back as a
    TuneConfig), never a mistyped --out such as a model folder or a home directory."""
    if any(folder.iterdir()):
        try:
            read_saved_config(str(folder))
        except ConfigError as e:
            raise ConfigError(f"--overwrite replaces only a run folder: {e}; nothing was deleted") from None


def _load_checkpoint_checked(run: Path, spec: LoraSpec, model_dir: str, steps: int
                             ) -> tuple[LoraAdapter, int] | None:
    """A resumed run's checkpoint, if any, refused unless it is this config's model and shape;
    and its logs, refused if a line cannot be read (the file and line are named)."""
    for log in ("trajectory.jsonl", "metrics.jsonl"):
        _read_log(run / log)
    _tidy_checkpoints(run)
    folder = run / "checkpoint"
    state_path, config_path = folder / "state.json", folder / "adapter" / "adapter_config.json"
    if not state_path.exists():
        return None
    try:
        step = json.loads(state_path.read_text())["step"]
        if type(step) is not int or step < 0:
            raise ValueError(f"step {step!r} is not a count")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise ConfigError(f"{state_path}: unreadable ({type(e).__name__}: {e})".splitlines()[0]) from None
    try:
        adapter = LoraAdapter.load(folder / "adapter")
        saved = json.loads(config_path.read_text())
    except AdapterError:
        raise
    except (OSError, ValueError, SafetensorError) as e:
        raise ConfigError(f"{folder / 'adapter'}: unreadable ({type(e).__name__}: {e})".splitlines()[0]) from None
    if adapter.spec != spec:
        raise ConfigError(f"{folder} has adapter {adapter.spec}, the config asks for {spec}")
    base = saved.get("base_model_name_or_path") if isinstance(saved, dict) else None
    if base and Path(base).resolve() != Path(model_dir).resolve():
        raise ConfigError(f"{config_path}: base_model_name_or_path is {base}, the config's model is "
                          f"{model_dir}: a checkpoint continues only on the base model it was trained on")
    if step > steps:
        raise ConfigError(f"--steps {steps}: the checkpoint in {run} is already at step {step}")
    return adapter, step


def start_engine(cfg: TuneConfig, model_dir: str, adapter: LoraAdapter) -> ScoringEngine:
    """The engine a run's settings ask for, holding `adapter` as its master copy."""
    if cfg.engine == "reference":
        from .reference import ReferenceEngine

        return ReferenceEngine(model_dir, adapter, dtype=cfg.dtype, max_model_len=cfg.max_length,
                               trust_remote_code=cfg.trust_remote_code)
    from .engine import EngineConfig, VllmEngine

    config = EngineConfig(model=model_dir, dtype=cfg.dtype, max_model_len=cfg.max_length,
                          n_variants=2 * cfg.directions, seed=cfg.seed, fast=cfg.fast,
                          trust_remote_code=cfg.trust_remote_code,
                          tensor_parallel_size=cfg.tensor_parallel_size,
                          pipeline_parallel_size=cfg.pipeline_parallel_size)
    if cfg.replicas > 1 or cfg.ray_address is not None:
        from .replicas import ReplicatedEngine

        return ReplicatedEngine(config, adapter, cfg.replicas, cfg.ray_address)
    return VllmEngine(config, adapter)


def tune(cfg: TuneConfig, resume: bool = False, overwrite: bool = False,
         engine: ScoringEngine | None = None) -> dict[str, Any]:
    """Run (or continue) MeZO-LoRA training; returns the summary also printed at the end.

    `engine`: an already running engine of the same model (tests, sweeps), given the run's
    adapter with `load_master`; by default a vLLM engine is started for the run.
    """
    # Pre-flight: everything that can be wrong with the settings, the data, the model or the run
    # folder is found here, before the engine starts (tens of seconds) and before anything on
    # disk is changed (--overwrite deletes the old run only once all checks have passed).
    cfg.validate()
    started = time.perf_counter()
    run = Path(cfg.out)
    _check_out(run, resume, overwrite)
    train_set, dev_set = load_splits(cfg)
    if cfg.objective == "f1" and train_set.kind == CLASSIFICATION:
        raise ConfigError(f"--objective f1 scores generated answers: {train_set.name} is classification data")
    model_dir = str(resolve_model(cfg.model).resolve())  # absolute: adapters and checkpoints record it
    try:
        shapes = model_linear_shapes(model_dir)
    except (OSError, SafetensorError) as e:
        raise ModelError(f"{model_dir}: cannot read the *.safetensors headers ({e})") from None
    if not shapes:
        raise ModelError(f"{model_dir}: no decoder-layer linear weights (*.layers.*.weight) in its *.safetensors")
    spec = LoraSpec(r=cfg.rank, alpha=cfg.alpha, targets=resolve_targets(cfg.targets, shapes))
    checkpoint = _load_checkpoint_checked(run, spec, model_dir, cfg.steps) if resume else None
    if overwrite and not resume and run.exists():
        _refuse_unless_a_run(run)
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")

    adapter, start = checkpoint if checkpoint else (LoraAdapter.init(spec, shapes, cfg.seed), 0)
    _truncate_jsonl(run / "trajectory.jsonl", lambda r: r["step"] < start)  # step = the step taken
    _truncate_jsonl(run / "metrics.jsonl", lambda r: r["step"] <= start)  # step = steps done

    if engine is None:
        engine = start_engine(cfg, model_dir, adapter)
    else:
        engine.load_master(adapter)
    engine = _WatchedEngine(engine, run, start)
    train = Split.make(train_set, engine.tokenizer, cfg.max_length, cfg.overflow)
    dev = Split.make(dev_set, engine.tokenizer, cfg.max_length, cfg.overflow) if dev_set else None
    if dev is not None and cfg.eval_examples:
        keep = sorted(dev.by_example)[: cfg.eval_examples]
        dev = Split(dev.dataset, dev.requests_of(keep), {i: dev.by_example[i] for i in keep})

    # wall_s: seconds since the run began, engine start included, summed over resumed segments
    # (a segment's time after its last evaluation is not counted): accuracy-vs-time plots
    wall0 = max((m.get("wall_s", 0.0) for m in _read_log(run / "metrics.jsonl")[0]), default=0.0)

    def dev_metrics(step: int, skipped: int = 0) -> dict[str, float]:
        engine.write_variants([(0, 0.0)])
        metrics = {"step": step, **evaluate(engine, dev, 0), "skipped_steps": skipped,
                   "wall_s": round(wall0 + time.perf_counter() - started, 1)}
        _append_jsonl(run / "metrics.jsonl", metrics)
        tqdm.write(f"step {step}: dev " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                   if k not in ("step", "skipped_steps", "wall_s")))
        return metrics

    if dev is not None and start == 0:
        first = dev_metrics(0)
    else:
        first = next((m for m in _read_log(run / "metrics.jsonl")[0] if m["step"] == 0), None)
    estimator = make_estimator(cfg.estimator, cfg.weight_decay, cfg.momentum, cfg.momentum_window,
                               cfg.lozo_rank, cfg.lozo_period, cfg.seed)
    examples = sorted(train.by_example)
    taken = _read_log(run / "trajectory.jsonl")[0]  # a resumed run counts on from its steps so far
    estimator.restore(taken)  # e.g. momentum's window of recent (seed, g)
    skipped = sum(bool(r.get("skipped")) for r in taken)
    in_a_row = next((i for i, r in enumerate(reversed(taken)) if not r.get("skipped")), len(taken))
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="MeZO", unit="step")
    with _StopOnSigint() as sigint:
        for step in bar:
            engine.steps_done = step
            t0 = time.perf_counter()
            requests = train.requests_of(batch_examples(cfg.seed, step, examples, cfg.batch_size))
            seeds = [step_seed(cfg.seed, step, k) for k in range(cfg.directions)]
            lr = learning_rate(cfg.lr, cfg.lr_schedule, step, cfg.steps)
            losses, grads = mezo_step(engine, train, requests, estimator.directions(step, seeds), cfg.eps,
                                      estimator, lr, cfg.objective)
            record = {"step": step, "seed": seeds[0], "g": grads[0], "loss_plus": losses[0],
                      "loss_minus": losses[1], "lr": lr}
            if cfg.directions > 1:
                record.update(seeds=seeds, grads=grads)
            finite = all(math.isfinite(g) for g in grads)
            skipped, in_a_row = skipped + (not finite), 0 if finite else in_a_row + 1
            if not finite:
                record["skipped"] = True
            _append_jsonl(run / "trajectory.jsonl", record)
            engine.steps_done = step + 1
            tokens = sum(len(r.token_ids) for r in requests) * len(losses)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
            done = step + 1
            if dev is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                dev_metrics(done, skipped)  # before a stop, so a resumed run's metrics miss none
            if in_a_row >= MAX_NONFINITE_IN_A_ROW or sigint.requested:
                save_checkpoint(run, LoraAdapter(spec, engine.master()), model_dir, done)
                why = (f"{in_a_row} steps in a row had a non-finite loss (try a smaller --lr or --eps)"
                       if in_a_row >= MAX_NONFINITE_IN_A_ROW else "interrupted")
                raise TrainingStopped(f"{why}: stopped after step {done}, checkpoint saved; "
                                      f"continue with: mezo-vllm tune --resume {run}")
            if cfg.save_every and done % cfg.save_every == 0:
                save_checkpoint(run, LoraAdapter(spec, engine.master()), model_dir, done)
    bar.close()

    final = LoraAdapter(spec, engine.master())
    # metrics first: a checkpoint at the last step then always has its metrics line
    last = dev_metrics(cfg.steps, skipped) if dev is not None else None
    save_checkpoint(run, final, model_dir, cfg.steps)
    _write_whole(run / "adapter", lambda folder: final.save(folder, model_dir))
    from .plots import plot_curves

    plot_curves(run)
    return {"run": str(run), "before": first, "after": last}
