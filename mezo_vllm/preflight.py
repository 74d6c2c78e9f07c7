"""Pre-flight of a run: everything that can be wrong with the settings, the data, the model or
the run folder is found before anything is written or the engine starts (tens of seconds), and
a resumed run's checkpoint is checked against the config it continues with.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from safetensors import SafetensorError

from . import console, patches, rundir
from .adapter import (
    LoraAdapter,
    LoraSpec,
    init_from,
    model_linear_shapes,
    resolve_targets,
)
from .config import ConfigError, TuneConfig
from .data import (
    CLASSIFICATION,
    Dataset,
    hold_out,
    load_file,
    load_records,
    load_task,
    tokenizer_loader,
)
from .data.types import warn
from .model import ModelError, resolve_model
from .platform_policy import check_pipeline_parallel, engine_dtype, installed_platform
from .recipe import read_saved_config


@dataclass
class Prepared:
    """A run that passed every check: nothing is written and no engine started yet."""

    cfg: TuneConfig
    run: Path
    model_dir: str
    shapes: dict[str, tuple[int, int]]
    spec: LoraSpec
    train: Dataset
    dev: Dataset | None
    checkpoint: tuple[LoraAdapter, int] | None
    best: tuple[dict, LoraAdapter] | None  # the checkpoint's best dev record and adapter
    init: LoraAdapter | None  # --init-adapter, when there is no checkpoint to continue


# Records given to `tune` in memory are saved in the run folder under these names, which the
# run's config.json then holds as --data / --eval-data, so the run resumes like any other.
IN_MEMORY = {"data": "data.jsonl", "eval_data": "eval_data.jsonl"}


def load_splits(cfg: TuneConfig, model_dir: str,
                records: dict[str, Sequence[Any] | None] | None = None) -> tuple[Dataset, Dataset | None]:
    """The train and dev data; `records`: in-memory records in place of the --data/--eval-data files."""
    if cfg.task is not None:
        splits = load_task(cfg.task)
        return splits.train, splits.dev
    records = records or {}
    chat_tokenizer = tokenizer_loader(model_dir, cfg.trust_remote_code)

    def load(name: str) -> Dataset | None:
        if records.get(name) is not None:
            return load_records(records[name], name, chat_tokenizer)
        path = getattr(cfg, name)
        return load_file(path, chat_tokenizer) if path else None

    train, dev = load("data"), load("eval_data")
    assert train is not None  # validate(): --task or --data
    if dev is not None and dev.kind != train.kind:
        raise ConfigError(f"{dev.name} is {dev.kind} data but {train.name} is {train.kind}")
    if cfg.eval_split:
        train, dev = hold_out(train, cfg.eval_split, cfg.seed)
    if dev is None:
        warn(train.name, "dev data", "none, so nothing is evaluated before, during or after training: "
             "give --eval-data FILE, or --eval-split 0.1 to hold out a tenth of the training data")
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


def is_a_run(folder: Path) -> bool:
    try:
        read_saved_config(str(folder))
    except ConfigError:
        return False
    return True


def _refuse_unless_a_run(folder: Path) -> None:
    """--overwrite deletes a folder: only one a run wrote (its config.json reads back as a
    TuneConfig), never a mistyped --out such as a model folder or a home directory."""
    if any(folder.iterdir()):
        try:
            read_saved_config(str(folder))
        except ConfigError as e:
            raise ConfigError(f"--overwrite replaces only a run folder: {e}; nothing was deleted") from None


def _checked_checkpoint(run: Path, spec: LoraSpec, model_dir: str, steps: int
                        ) -> tuple[LoraAdapter, int] | None:
    """A resumed run's checkpoint, if any, refused unless it is this config's model and shape;
    and its logs, refused if a line cannot be read (the file and line are named)."""
    for log in ("trajectory.jsonl", "metrics.jsonl"):
        rundir.read_log(run / log)
    checkpoint = rundir.load_checkpoint(run)
    if checkpoint is None:
        return None
    adapter, step = checkpoint
    folder = run / rundir.CHECKPOINT
    if adapter.spec != spec:
        raise ConfigError(f"{folder} has adapter {adapter.spec}, the config asks for {spec}")
    config_path = folder / "adapter" / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    base = saved.get("base_model_name_or_path") if isinstance(saved, dict) else None
    if base and Path(base).resolve() != Path(model_dir).resolve():
        raise ConfigError(f"{config_path}: base_model_name_or_path is {base}, the config's model is "
                          f"{model_dir}: a checkpoint continues only on the base model it was trained on")
    if step > steps:
        raise ConfigError(f"--steps {steps}: the checkpoint in {run} is already at step {step}")
    return adapter, step


def prepare(cfg: TuneConfig, resume: bool = False, overwrite: bool = False,
            records: dict[str, Sequence[Any] | None] | None = None) -> Prepared:
    """Everything that can be wrong with the settings, the data, the model or the run folder is
    found here, before the engine starts (tens of seconds) and before anything on disk is
    changed (--overwrite deletes the old run only once all checks have passed). `records`: the
    in-memory data given to `tune`."""
    cfg.validate()
    # the run records the dtype it ran with ("auto" resolved for the installed vLLM)
    cfg = replace(cfg, dtype=engine_dtype(cfg.dtype, cfg.engine))
    if cfg.engine == "vllm":
        patches.check_installed(cfg.fast)
        check_pipeline_parallel(cfg.pipeline_parallel_size, installed_platform())
    run = Path(cfg.out)
    _check_out(run, resume, overwrite)
    # the model first: chat data is rendered with its chat template
    model_dir = str(resolve_model(cfg.model).resolve())  # absolute: adapters and checkpoints record it
    train, dev = load_splits(cfg, model_dir, records)
    if cfg.objective == "f1" and train.kind == CLASSIFICATION:
        raise ConfigError(f"--objective f1 scores generated answers: {train.name} is classification data")
    try:
        shapes = model_linear_shapes(model_dir)
    except (OSError, SafetensorError) as e:
        raise ModelError(f"{model_dir}: cannot read the *.safetensors headers ({e})") from None
    if not shapes:
        raise ModelError(f"{model_dir}: no decoder-layer linear weights (*.layers.*.weight) in its *.safetensors")
    spec = LoraSpec(r=cfg.rank, alpha=cfg.alpha, targets=resolve_targets(cfg.targets, shapes))
    checkpoint = _checked_checkpoint(run, spec, model_dir, cfg.steps) if resume else None
    best = rundir.load_best(run) if checkpoint else None
    init = init_from(cfg.init_adapter, spec, shapes) if cfg.init_adapter and not checkpoint else None
    if overwrite and not resume and run.exists():
        _refuse_unless_a_run(run)
    return Prepared(cfg, run, model_dir, shapes, spec, train, dev, checkpoint, best, init)


def note_schedule_change(p: Prepared) -> None:
    """A resumed run with another --steps decays its lr to 0 at the new last step: say so."""
    saved = p.run / "config.json"
    if p.checkpoint is None or p.cfg.lr_schedule == "constant" or not saved.is_file():
        return
    steps = json.loads(saved.read_text()).get("steps")
    if isinstance(steps, int) and steps != p.cfg.steps:
        console.say(f"note: --steps {p.cfg.steps} (the run was started with {steps}): the {p.cfg.lr_schedule} "
                    f"schedule now decays to 0 at step {p.cfg.steps}; steps before {p.checkpoint[1]} "
                    f"followed the old one")


def in_memory(cfg: TuneConfig, records: dict[str, Sequence[Any] | None]) -> TuneConfig:
    """The config with each in-memory data set's file in the run folder in place of its path."""
    for name, given in records.items():
        if given is not None:
            if getattr(cfg, name) is not None:
                raise ConfigError(f"tune({name}=...) is given records and the config a {name} file: give one")
            cfg = replace(cfg, **{name: str(Path(cfg.out) / IN_MEMORY[name])})
    return cfg
