"""`mezo-vllm`: tune, eval, export, serve, model, tasks, bench, validate.

The options of `tune`, `validate` and the shared ones of `eval` are generated from the settings
dataclasses (`options.py`); this module only wires commands to the library.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from . import __version__, console
from .config import DTYPES, ConfigError, TuneConfig
from .errors import USER_ERRORS, EngineStartError
from .options import given_settings, settings_options
from .recipe import read_recipe, read_saved_config
from .trainer import TrainingStopped
from .validate import ValidateConfig


def _one_line_errors(fn: Callable) -> Callable:
    """Bad input ends in one line naming what is wrong and exit code 2, never a traceback; an
    engine that does not start, or a run that stops, in one line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except EngineStartError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except TrainingStopped as e:
            click.echo(f"stopped: {e}", err=True)
            sys.exit(1)

    return wrapper


@contextlib.contextmanager
def _engine_output(log: Path, verbose: bool) -> Iterator[None]:
    """vLLM's and torch's output in `log` for the block, as `tune` keeps it in RUN/engine.log, so
    the terminal shows our lines only; an engine that does not start names the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with console.quiet(log, verbose):
        try:
            yield
        except EngineStartError as e:
            raise EngineStartError(str(e) if verbose else f"{e}; vLLM's log: {log}") from e.__cause__


_VERBOSE = "show vLLM's and torch's logs and warnings (default: in {})"


@click.group()
@click.version_option(__version__, prog_name="mezo-vllm")
def main() -> None:
    """Fine-tune LoRA adapters with forward passes only (MeZO), on the vLLM engine."""


@main.command()
@click.option("--config", "recipe", type=click.Path(),
              help="recipe file (YAML or JSON) with the keys of a run's config.json; flags given here override it")
@click.option("--resume", "resume_dir", type=click.Path(), help="continue the run in this folder")
@click.option("--overwrite", is_flag=True, help="replace an existing --out run folder")
@click.option("--verbose", is_flag=True, help=_VERBOSE.format("RUN/engine.log"))
@settings_options(TuneConfig)
@_one_line_errors
def tune(recipe: str | None, resume_dir: str | None, overwrite: bool, verbose: bool, **values: Any) -> None:
    """Train a LoRA adapter with MeZO; writes a run folder with a PEFT adapter (the final one in
    RUN/adapter, the best on the dev data in RUN/best) and ends with a summary."""
    from .trainer import tune as run_tune

    given = {**(read_recipe(recipe) if recipe else {}), **given_settings(TuneConfig, values)}
    if resume_dir:
        if overwrite:
            raise ConfigError("--resume continues a run and --overwrite replaces it: give one of them")
        cfg = read_saved_config(resume_dir).resumed(resume_dir, given)
    else:
        if not given.get("out"):
            raise ConfigError("--out is required (or --resume RUN_DIR)")
        cfg = TuneConfig(**given)
    run_tune(cfg, resume=bool(resume_dir), overwrite=overwrite, verbose=verbose)


@main.command("eval")
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(), help="PEFT adapter folder")
@click.option("--task", help="built-in task")
@click.option("--split", type=click.Choice(["dev", "test"]), default="test", show_default=True,
              help="the built-in task's split to evaluate on")
@click.option("--data", type=click.Path(), help="JSONL/CSV data instead of --task")
@click.option("--model", help="base model folder (default: the adapter's base model)")
@click.option("--verbose", is_flag=True, help=_VERBOSE.format("a log file under the system's temp folder"))
@settings_options(TuneConfig, only=("dtype", "max_length", "trust_remote_code"))
@_one_line_errors
def eval_(adapter_dir: str, task: str | None, split: str, data: str | None, model: str | None, verbose: bool,
          dtype: str, max_length: int, trust_remote_code: bool) -> None:
    """The metric of an adapter and of the base model without it, on the same data."""
    from .adapter import LoraAdapter
    from .data import Split, load_file, load_task, tokenizer_loader
    from .engine import EngineConfig, VllmEngine
    from .evaluation import evaluate
    from .model import resolve_model
    from .platform_policy import engine_dtype

    if (task is None) == (data is None):
        raise ConfigError("give exactly one of --task NAME or --data FILE")
    adapter = LoraAdapter.load(adapter_dir)
    base = model or json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter_dir}/adapter_config.json names no base model: pass --model")
    model_dir = str(resolve_model(base))
    dataset = (getattr(load_task(task), split) if task
               else load_file(data, tokenizer_loader(model_dir, trust_remote_code)))  # chat: the model's template
    log = Path(tempfile.gettempdir()) / f"mezo-vllm-eval-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    with _engine_output(log, verbose):
        engine = VllmEngine(EngineConfig(model=model_dir, dtype=engine_dtype(dtype), max_model_len=max_length,
                                         n_variants=1, trust_remote_code=trust_remote_code), adapter)
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
    """The embedded models (`--model NAME`), shipped by PyPI packages as GGUF files."""


@model.command("list")
def list_models() -> None:
    """The embedded models: name, what it is, its licence, and whether it is prepared or how to install it."""
    from importlib.metadata import PackageNotFoundError, distribution

    from .model import EMBEDDED

    for m in EMBEDDED.values():
        try:
            distribution(m.package)
            state = f"prepared in {m.folder()}" if m.folder().is_dir() else "installed, prepared on first use"
        except PackageNotFoundError:
            state = f"not installed: {m.install}"
        click.echo(f"{m.name}: {m.title}; {m.licence}; {state}")


@model.command()
@click.argument("name", default="smollm2-135m")
@click.option("--force", is_flag=True, help="prepare again even if it is cached")
@_one_line_errors
def prepare(name: str, force: bool) -> None:
    """Dequantize an embedded model's GGUF (NAME, default smollm2-135m) into an HF safetensors folder."""
    from .model import prepare_embedded

    click.echo(prepare_embedded(name, force=force))


@main.command()
@_one_line_errors
def tasks() -> None:
    """The built-in tasks, with their split sizes and templates."""
    from .data import builtin_tasks, load_task, task_template

    for name in builtin_tasks():
        s = load_task(name)
        click.echo(f"{name}: {s.train.kind}, train {len(s.train.examples)} / dev {len(s.dev.examples)} / "
                   f"test {len(s.test.examples)}; {task_template(name)}")


@main.command()
@click.option("--verbose", is_flag=True, help=_VERBOSE.format("OUT/engine.log"))
@settings_options(ValidateConfig)
@_one_line_errors
def validate(verbose: bool, **values: Any) -> None:
    """Check the vLLM engine against transformers + PEFT on your model and data (run it first
    on a new model): losses, g vs autograd, ε sweep, prefix sharing. Writes a markdown report."""
    from .validate import VERDICT, passed, run_validate

    cfg = ValidateConfig(**values)
    cfg.validate()  # before the folder of its log is made
    with _engine_output(Path(cfg.out) / "engine.log", verbose):
        out = run_validate(cfg, echo=console.say)
    verdicts = passed(json.loads((out / "results.json").read_text()))
    for name, ok in verdicts.items():
        click.echo(f"{VERDICT[ok]}  {name}")
    if any(ok is False for ok in verdicts.values()):
        sys.exit(1)


@main.command()
@click.option("--out", type=click.Path(), default="runs/bench", show_default=True)
@click.option("--steps", type=int, default=3, show_default=True, help="timed MeZO steps per workload")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(list(DTYPES)),
              help="engine dtypes to measure (repeatable; default: those this CPU runs natively)")
@_one_line_errors
def bench(out: str, steps: int, dtypes: tuple[str, ...]) -> None:
    """mezo-vllm vs stock vLLM vs a batched transformers+PEFT loop, end to end: a table of
    ratios, JSON and a PNG."""
    from .bench import format_table, run_bench

    results = run_bench(Path(out), steps, list(dtypes) or None, echo=click.echo)
    click.echo(format_table(results))
    click.echo(f"wrote {out}/bench.json and {out}/bench.png")
