"""`mezo-vllm`: tune, eval, export, serve, model, tasks, bench, validate."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .adapter import AdapterError
from .config import ConfigError, TuneConfig
from .data import DataError
from .model import ModelError
from .trainer import TrainingStopped

_USER_ERRORS = (ConfigError, DataError, AdapterError, ModelError)
_DEFAULTS = TuneConfig(out="")


def _one_line_errors(fn: Callable) -> Callable:
    """Bad input ends in one line naming what is wrong and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except TrainingStopped as e:
            click.echo(f"stopped: {e}", err=True)
            sys.exit(1)

    return wrapper


@click.group()
def main() -> None:
    """Fine-tune LoRA adapters with forward passes only (MeZO), on the vLLM engine."""


def _targets(value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


@main.command()
@click.option("--task", help="built-in task (see `mezo-vllm tasks`)")
@click.option("--data", type=click.Path(), help="training data: JSONL or CSV")
@click.option("--eval-data", type=click.Path(), help="dev data for --data")
@click.option("--model", help="HF model folder (safetensors); default: the embedded SmolLM2-135M-Instruct")
@click.option("--out", type=click.Path(), help="run folder")
@click.option("--resume", "resume_dir", type=click.Path(), help="continue the run in this folder")
@click.option("--overwrite", is_flag=True, help="replace an existing --out folder")
@click.option("--targets", default=",".join(_DEFAULTS.targets), show_default=True,
              help="LoRA target modules, comma-separated, or all-linear")
@click.option("--rank", type=int, default=_DEFAULTS.rank, show_default=True)
@click.option("--alpha", type=float, default=_DEFAULTS.alpha, show_default=True)
@click.option("--lr", type=float, default=_DEFAULTS.lr, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "linear"]), default=_DEFAULTS.lr_schedule,
              show_default=True, help="linear: decay to 0 at the last step")
@click.option("--eps", type=float, default=_DEFAULTS.eps, show_default=True)
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True)
@click.option("--steps", type=int, default=_DEFAULTS.steps, show_default=True)
@click.option("--directions", type=int, default=_DEFAULTS.directions, show_default=True,
              help="n-SPSA: average this many ±εz estimates per step (one engine call)")
@click.option("--estimator", type=click.Choice(["zo-sgd", "momentum", "lozo"]), default=_DEFAULTS.estimator,
              show_default=True, help="update rule: ZO-SGD, ZO-SGD with momentum, LOZO (low-rank directions)")
@click.option("--momentum", type=float, default=_DEFAULTS.momentum, show_default=True,
              help="--estimator momentum: β of the moving average")
@click.option("--momentum-window", type=int, default=_DEFAULTS.momentum_window, show_default=True,
              help="--estimator momentum: steps kept (their z is regenerated every step)")
@click.option("--lozo-rank", type=int, default=_DEFAULTS.lozo_rank, show_default=True,
              help="--estimator lozo: rank of each matrix's direction U·Vᵀ")
@click.option("--lozo-period", type=int, default=_DEFAULTS.lozo_period, show_default=True,
              help="--estimator lozo: steps between redraws of V")
@click.option("--objective", type=click.Choice(["loss", "f1"]), default=_DEFAULTS.objective, show_default=True,
              help="loss: log-prob loss; f1: −F1 of greedy answers (generation tasks)")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@click.option("--weight-decay", type=float, default=_DEFAULTS.weight_decay, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=_DEFAULTS.dtype, show_default=True,
              help="the engine's dtype; the master adapter is always fp32")
@click.option("--eval-every", type=int, default=_DEFAULTS.eval_every, show_default=True, help="0 = only before and after")
@click.option("--eval-examples", type=int, default=_DEFAULTS.eval_examples, show_default=True,
              help="dev examples per evaluation (0 = all)")
@click.option("--save-every", type=int, default=_DEFAULTS.save_every, show_default=True)
@click.option("--max-length", type=int, default=_DEFAULTS.max_length, show_default=True)
@click.option("--overflow", type=click.Choice(["truncate", "reject"]), default=_DEFAULTS.overflow, show_default=True,
              help="examples longer than --max-length: cut the context from the left, or drop them")
@click.option("--stock-vllm", is_flag=True, help="run without the speed-up patches (for comparison)")
@click.option("--engine", type=click.Choice(["vllm", "reference"]), default=_DEFAULTS.engine, show_default=True,
              help="reference: transformers + PEFT with the same seeds and scoring (the oracle; slow)")
@click.option("--replicas", type=int, default=_DEFAULTS.replicas, show_default=True,
              help="data-parallel vLLM engines on Ray, each scoring a share of the batch")
@click.option("--ray-address", help="an existing Ray cluster for the replicas (default: start a local one)")
@click.option("--tensor-parallel-size", type=int, default=_DEFAULTS.tensor_parallel_size, show_default=True,
              help="vLLM tensor parallelism inside each engine")
@click.option("--pipeline-parallel-size", type=int, default=_DEFAULTS.pipeline_parallel_size, show_default=True,
              help="vLLM pipeline parallelism inside each engine")
@click.option("--trust-remote-code", is_flag=True,
              help="let the model folder run its own Python code (HF auto_map); off by default")
@_one_line_errors
def tune(resume_dir: str | None, overwrite: bool, targets: str, stock_vllm: bool, **options: Any) -> None:
    """Train a LoRA adapter with MeZO; writes a run folder with a PEFT adapter."""
    from .trainer import tune as run_tune

    if resume_dir:
        if overwrite:
            raise ConfigError("--resume continues a run and --overwrite replaces it: give one of them")
        cfg = _resumed_config(resume_dir, targets, stock_vllm, options)
    else:
        if not options["out"]:
            raise ConfigError("--out is required (or --resume RUN_DIR)")
        cfg = TuneConfig(targets=_targets(targets), fast=not stock_vllm, **options)
    summary = run_tune(cfg, resume=bool(resume_dir), overwrite=overwrite)
    click.echo(f"adapter: {summary['run']}/adapter")
    if summary["before"] and summary["after"]:
        for key in summary["after"]:
            if key not in ("step", "skipped_steps", "wall_s"):
                click.echo(f"dev {key}: {summary['before'][key]:.4f} before, {summary['after'][key]:.4f} after")


# Settings a resumed run may take from the command line; the others are the run's for good.
# Where it runs (replicas, cluster, model parallelism) changes no number of the trajectory.
_SCALE_OUT = ("replicas", "ray_address", "tensor_parallel_size", "pipeline_parallel_size")
_RESUME_MAY_CHANGE = ("steps", "trust_remote_code", *_SCALE_OUT)


def _resumed_config(resume_dir: str, targets: str, stock_vllm: bool, options: dict[str, Any]) -> TuneConfig:
    """The run's saved config, in the folder given (it may have moved), with a new --steps.

    Any other setting given on the command line must equal the saved one: silently training
    on with another model, rank or learning rate than the checkpoint's would be worse than
    an error. --trust-remote-code is never read from the folder: only the user grants it.
    """
    saved = Path(resume_dir) / "config.json"
    if not saved.is_file():
        raise ConfigError(f"{resume_dir}: not a run folder (no config.json)")
    try:
        cfg = TuneConfig.from_json(json.loads(saved.read_text()))
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{saved}: cannot read ({type(e).__name__})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{saved}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except ConfigError as e:
        raise ConfigError(f"{saved}: {e}") from None
    given = {**options, "targets": _targets(targets), "fast": not stock_vllm}
    ctx = click.get_current_context()

    def on_command_line(param: str) -> bool:
        return ctx.get_parameter_source(param) is click.core.ParameterSource.COMMANDLINE

    for name, value in given.items():
        param = "stock_vllm" if name == "fast" else name
        if name in _RESUME_MAY_CHANGE or not on_command_line(param):
            continue
        flag = "--" + param.replace("_", "-")
        if name == "out":
            if Path(value).resolve() != Path(resume_dir).resolve():
                raise ConfigError(f"--out {value}: --resume {resume_dir} is the run folder; give one of them")
            continue
        old = getattr(cfg, name)
        if not (_same_model(value, old) if name == "model" else value == old):
            shown = flag if param == "stock_vllm" else f"{flag} {value}"
            raise ConfigError(f"{shown}: the run in {resume_dir} was started with {name}={old!r}; "
                              "a resumed run keeps its settings (only --steps, --trust-remote-code "
                              "and the scale-out options may change)")
    cfg = dataclasses.replace(cfg, **{k: options[k] for k in _SCALE_OUT if on_command_line(k)})
    return dataclasses.replace(cfg, out=resume_dir, trust_remote_code=options["trust_remote_code"],
                               steps=options["steps"] if on_command_line("steps") else cfg.steps)


def _same_model(a: str | None, b: str | None) -> bool:
    from .model import DEFAULT_MODEL

    a, b = a or DEFAULT_MODEL, b or DEFAULT_MODEL
    return a == b or Path(a).resolve() == Path(b).resolve()


@main.command("eval")
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(), help="PEFT adapter folder")
@click.option("--task", help="built-in task")
@click.option("--split", type=click.Choice(["dev", "test"]), default="test", show_default=True)
@click.option("--data", type=click.Path(), help="JSONL/CSV data instead of --task")
@click.option("--model", help="base model folder (default: the adapter's base model)")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--max-length", type=int, default=1024, show_default=True)
@click.option("--trust-remote-code", is_flag=True,
              help="let the model folder run its own Python code (HF auto_map); off by default")
@_one_line_errors
def eval_(adapter_dir: str, task: str | None, split: str, data: str | None, model: str | None,
          dtype: str, max_length: int, trust_remote_code: bool) -> None:
    """The metric of an adapter and of the base model without it, on the same data."""
    from .adapter import LoraAdapter
    from .data import load_file, load_task
    from .engine import EngineConfig, VllmEngine
    from .model import resolve_model
    from .trainer import Split, evaluate

    if (task is None) == (data is None):
        raise ConfigError("give exactly one of --task NAME or --data FILE")
    dataset = getattr(load_task(task), split) if task else load_file(data)
    adapter = LoraAdapter.load(adapter_dir)
    base = model or json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter_dir}/adapter_config.json names no base model: pass --model")
    model_dir = str(resolve_model(base))
    engine = VllmEngine(EngineConfig(model=model_dir, dtype=dtype, max_model_len=max_length, n_variants=1,
                                     trust_remote_code=trust_remote_code), adapter)
    data_split = Split.make(dataset, engine.tokenizer, max_length, "truncate")
    engine.write_variants([(0, 0.0)])
    without, with_ = evaluate(engine, data_split, None), evaluate(engine, data_split, 0)
    for key in with_:
        click.echo(f"{dataset.name} {key}: {without[key]:.4f} without the adapter, {with_[key]:.4f} with it")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--to", "dest", required=True, type=click.Path(), help="destination folder")
@click.option("--merge", is_flag=True, help="write a full model with the adapter merged in")
@_one_line_errors
def export(run_dir: str, dest: str, merge: bool) -> None:
    """Copy a run's adapter, or merge it into its base model (a folder vLLM serves without LoRA)."""
    from .export import merge_adapter

    adapter_dir = Path(run_dir) / "adapter"
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{run_dir}: no adapter/adapter_model.safetensors (has the run finished?)")
    if Path(dest).exists():
        raise ConfigError(f"{dest} exists: choose a new folder")
    if merge:
        merge_adapter(adapter_dir, Path(dest))
    else:
        shutil.copytree(adapter_dir, dest)
    click.echo(f"wrote {dest}")


@main.command()
@click.argument("target", metavar="RUN_OR_ADAPTER")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_SERVER_ARGS...]")
@click.option("--name", help="the model name requests ask for (default: the run folder's name)")
@click.option("--model", help="base model folder, if the adapter's base_model_name_or_path moved")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; 0.0.0.0 exposes the server to the network (give --api-key)")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", envvar="VLLM_API_KEY", show_envvar=True,
              help="requests must send 'Authorization: Bearer KEY'")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "auto"]),
              help="default: float32 with the CPU build of vLLM, vLLM's choice (auto) on GPU")
@click.option("--kv-cache-gib", type=float, default=1.0, show_default=True, help="KV cache size (CPU build)")
@click.option("--dry-run", is_flag=True, help="print the vLLM server command instead of running it")
@_one_line_errors
def serve(target: str, vllm_args: tuple[str, ...], name: str | None, model: str | None, host: str, port: int,
          api_key: str | None, dtype: str | None, kv_cache_gib: float, dry_run: bool) -> None:
    """Serve a run's adapter (or an `export --merge`d model) with vLLM's OpenAI-compatible server.

    RUN_OR_ADAPTER is a run folder, an adapter folder or a merged model folder. Flags after
    `--` go to vLLM's server as they are, after (so over) the ones derived from the run.
    """
    import shlex

    from . import serve as serving

    served = serving.resolve_target(target, name, model)
    command = serving.server_command(served, host, port, dtype, kv_cache_gib, vllm_args)
    env = serving.server_env(served, api_key)
    if dry_run:
        added = sorted(k for k in env if os.environ.get(k) != env[k])
        click.echo(" ".join(f"{k}={'<key>' if k == serving.API_KEY_ENV else env[k]}" for k in added)
                   + (" " if added else "") + shlex.join(command))
        return
    serving.check_port(host, port)
    for line in serving.describe(served, host, port, api_key):
        click.echo(line, err=True)
    serving.exec_server(command, env)


@main.group()
def model() -> None:
    """The embedded default model."""


@model.command()
@click.option("--force", is_flag=True, help="prepare again even if it is cached")
@_one_line_errors
def prepare(force: bool) -> None:
    """Dequantize the packaged SmolLM2-135M-Instruct GGUF into an HF safetensors folder."""
    from .model import prepare_default_model

    click.echo(prepare_default_model(force=force))


@main.command()
def tasks() -> None:
    """The built-in tasks, with their split sizes and templates."""
    from .data import builtin_tasks, load_task, task_template

    for name in builtin_tasks():
        s = load_task(name)
        click.echo(f"{name}: {s.train.kind}, train {len(s.train.examples)} / dev {len(s.dev.examples)} / "
                   f"test {len(s.test.examples)}; {task_template(name)}")


@main.command()
@click.option("--task", help="built-in task (see `mezo-vllm tasks`)")
@click.option("--data", type=click.Path(), help="JSONL or CSV data instead of --task")
@click.option("--model", help="HF model folder (safetensors); default: the embedded SmolLM2-135M-Instruct")
@click.option("--adapter", type=click.Path(), help="PEFT adapter to validate at (default: a seeded random one)")
@click.option("--out", type=click.Path(), default="runs/validate", show_default=True)
@click.option("--targets", default=",".join(_DEFAULTS.targets), show_default=True,
              help="LoRA target modules of the random adapter, comma-separated, or all-linear")
@click.option("--rank", type=int, default=_DEFAULTS.rank, show_default=True)
@click.option("--alpha", type=float, default=_DEFAULTS.alpha, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True, help="examples in the checked batch")
@click.option("--seeds", type=int, default=5, show_default=True, help="directions z checked")
@click.option("--vllm-directions", type=int, default=100, show_default=True,
              help="cosine vs n: real vLLM g's up to this n, the exact ∇L·z beyond")
@click.option("--max-length", type=int, default=_DEFAULTS.max_length, show_default=True)
@click.option("--trust-remote-code", is_flag=True,
              help="let the model folder run its own Python code (HF auto_map); off by default")
@_one_line_errors
def validate(targets: str, **options: Any) -> None:
    """Check the vLLM engine against transformers + PEFT on your model and data (run it first
    on a new model): losses, g vs autograd, ε sweep, prefix sharing. Writes a markdown report."""
    from .validate import ValidateConfig, passed, run_validate

    cfg = ValidateConfig(targets=_targets(targets), **options)
    out = run_validate(cfg, echo=click.echo)
    verdicts = passed(json.loads((out / "results.json").read_text()))
    for name, ok in verdicts.items():
        click.echo(f"{'pass' if ok else 'FAIL'}  {name}")
    if not all(verdicts.values()):
        sys.exit(1)


@main.command()
@click.option("--out", type=click.Path(), default="runs/bench", show_default=True)
@click.option("--steps", type=int, default=2, show_default=True, help="timed MeZO steps per workload")
def bench(out: str, steps: int) -> None:
    """transformers+PEFT vs stock vLLM vs patched vLLM: a table of ratios, JSON and a PNG."""
    from .bench import format_table, run_bench

    results = run_bench(Path(out), steps, echo=click.echo)
    click.echo(format_table(results))
    click.echo(f"wrote {out}/bench.json and {out}/bench.png")
