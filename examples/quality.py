"""The quality table: zero-shot vs MeZO-LoRA (mezo-vllm) vs first-order LoRA, on the 7 built-in tasks.

First-order LoRA (Adam with backprop, transformers + PEFT) lives only in this example: it is the
ceiling MeZO is measured against and the peak memory that MeZO avoids. Every method is scored
on the test split by the same vLLM engine (bfloat16, the adapters loaded into its slot), with
the task's metric: accuracy for classification, F1 of greedy answers for SQuAD and DROP.

Each stage is its own command, so a long budget can be spent in short sittings (CPU shared):

    python examples/quality.py mezo --task sst2 --task rte ...   # zero-shot + MeZO-LoRA, one engine
    python examples/quality.py first-order --task sst2           # Adam LoRA, one process per task
    python examples/quality.py eval-first-order --task sst2 ...  # its adapters on the test split
    python examples/quality.py defaults --task rte --seeds 0,1,2 # the library's defaults, with seeds
    python examples/quality.py score-run --task squad runs/quality/squad-lr2e-3-s0  # any run's adapters
    python examples/quality.py zero-shot --task sst2             # the base model alone
    python examples/quality.py report                            # tables, the defaults' plot, SST-2 curves, estimators
    python examples/quality.py all                               # everything, in order

A MeZO run that is interrupted (Ctrl-C, `timeout -s INT`) keeps its checkpoint; the next `mezo`
call resumes it exactly. Results land in runs/quality/ (one JSON per task and method).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np

OUT = Path("runs/quality")
TASKS = ("sst2", "rte", "cb", "copa", "boolq", "squad", "drop")
# Test examples scored per task and method: the splits are shuffled, so the first N are a
# random sample; capped so that 3 methods × 7 tasks fit in the CPU budget.
TEST_CAP = {"squad": 150, "drop": 150}  # generation is the slowest to score
DEFAULT_TEST_CAP = 300
COMMON = dict(dtype="bfloat16", directions=1, lr=2e-3, lr_schedule="linear", eps=1e-2, batch_size=16,
              targets=("q_proj", "v_proj"), rank=8, alpha=16.0, normalise=0)
# lr 2e-3 decayed over a few hundred steps is stable (docs/results.md, "Choosing the defaults"); held
# for longer it diverges on SST-2 (|g| 1.4 → 25 by step 550 of 3000), so the long run uses 1e-3.
MEZO_LR = {"sst2": 1e-3}
# MeZO steps per task (the budget of a shared 2-core machine); SST-2 gets the long run.
MEZO_STEPS = {"sst2": 3000, "rte": 300, "cb": 150, "copa": 200, "boolq": 100, "squad": 60, "drop": 60}
# First-order: Adam, linear decay, batch 8 (long contexts) or 16.
FO = {"sst2": (300, 16), "rte": (150, 16), "cb": (30, 16), "copa": (100, 16), "boolq": (30, 8),
      "squad": (30, 8), "drop": (30, 8)}
FO_DEV = 100  # dev examples per first-order evaluation (BoolQ's dev split has 500)
FO_LR = 5e-4


def _save(name: str, record: dict[str, Any]) -> None:
    (OUT / "results").mkdir(parents=True, exist_ok=True)
    (OUT / "results" / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _load(name: str) -> dict[str, Any] | None:
    path = OUT / "results" / f"{name}.json"
    return _json(path) if path.exists() else None


def _first_order_name(task: str, base: str | None) -> str:
    """Another model's results are kept out of the default model's `TASK-first-order*` globs."""
    return f"{task}-" + (f"{base}-" if base else "") + "first-order"


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def _test_split(task: str, tokenizer: Any):
    from mezo_vllm.data import Dataset, load_task
    from mezo_vllm.data import Split

    test = load_task(task).test
    test = Dataset(test.name, test.kind, test.examples[: TEST_CAP.get(task, DEFAULT_TEST_CAP)])
    return Split.make(test, tokenizer, 1024, "truncate")


def _metric(engine: Any, split: Any, variant: int | None) -> float:
    from mezo_vllm.evaluation import evaluate

    m = evaluate(engine, split, variant)
    return m["accuracy"] if "accuracy" in m else m["f1"]


def _engine(directions: int = 1, dtype: str = "bfloat16", base: str | None = None):
    from mezo_vllm.adapter import LoraAdapter, LoraSpec, model_linear_shapes
    from mezo_vllm.engine import EngineConfig, VllmEngine
    from mezo_vllm.model import resolve_model

    model = str(resolve_model(base).resolve())
    adapter = LoraAdapter.init(LoraSpec(), model_linear_shapes(model), seed=0)
    return VllmEngine(EngineConfig(model=model, dtype=dtype, n_variants=2 * directions), adapter)


def _score_adapter(engine: Any, split: Any, adapter_dir: Path) -> float:
    from mezo_vllm.adapter import LoraAdapter

    engine.load_master(LoraAdapter.load(adapter_dir))
    engine.write_variants([(0, 0.0)])
    return _metric(engine, split, 0)


def mezo_config(task: str, out: Path, **overrides: Any):
    from mezo_vllm.config import TuneConfig

    steps = MEZO_STEPS[task]
    generation = task in ("squad", "drop")
    every = 250 if steps > 1000 else steps // 2
    values = dict(COMMON, out=str(out), task=task, steps=steps, lr=MEZO_LR.get(task, COMMON["lr"]),
                  eval_every=every, save_every=every, eval_examples=50 if generation else 0)
    values.update(overrides)
    return TuneConfig(**values)


@click.group()
def main() -> None:
    """Zero-shot vs MeZO-LoRA vs first-order LoRA on the built-in tasks."""


@main.command()
@click.option("--task", "tasks", multiple=True, type=click.Choice(TASKS), default=TASKS)
def mezo(tasks: Sequence[str]) -> None:
    """Zero-shot and MeZO-LoRA test metric per task, on one bf16 engine (training included)."""
    from mezo_vllm.trainer import tune

    engine = _engine()
    for task in tasks:
        record = _load(f"{task}-mezo") or {}
        first = _load(_first_order_name(task, None))
        if "mezo" in record and (first is None or "test" in first):
            continue  # scored already
        split = _test_split(task, engine.tokenizer)
        if "zero_shot" not in record:
            record["zero_shot"] = _metric(engine, split, None)
            _save(f"{task}-mezo", record)
        run = OUT / f"{task}-mezo"
        cfg = mezo_config(task, run)
        if not (run / "adapter").exists():
            t0 = time.perf_counter()
            try:
                tune(cfg, resume=(run / "config.json").exists(), engine=engine)
            finally:  # an interrupted sitting counts too; the next one resumes the run
                record["stage_s"] = record.get("stage_s", 0.0) + time.perf_counter() - t0
                _save(f"{task}-mezo", record)
        # tune wall time: sittings of this stage (shared engine: its start not included) plus
        # sittings of the CLI (`<run>.segments`, engine start included)
        record.update(mezo=_score_adapter(engine, split, run / "adapter"), steps=cfg.steps,
                      test_examples=len(split.by_example), command=_tune_command(cfg),
                      train_s=record.get("stage_s", 0.0) + _segments_s(run))
        _save(f"{task}-mezo", record)
        click.echo(f"{task}: zero-shot {record['zero_shot']:.4f}, MeZO-LoRA {record['mezo']:.4f} "
                   f"({record['train_s']:.0f} s)")
        if first is not None and "test" not in first:  # scored here, saving an engine start
            first["test"] = _score_adapter(engine, split, OUT / _first_order_name(task, None) / "adapter")
            _save(_first_order_name(task, None), first)
            click.echo(f"{task}: first-order LoRA {first['test']:.4f}")


def _segments_s(run: Path) -> float:
    """Wall time of a run trained by the CLI in timed sittings (`<run>.segments`: start end)."""
    path = run.with_name(run.name + ".segments")
    if not path.exists():
        return 0.0
    return sum(float(e) - float(s) for _, s, e in (line.split() for line in path.read_text().splitlines()))


def _tune_command(cfg: Any) -> str:
    return (f"mezo-vllm tune --task {cfg.task} --dtype {cfg.dtype} --lr {cfg.lr} --eps {cfg.eps} "
            f"--batch-size {cfg.batch_size} --steps {cfg.steps} --estimator {cfg.estimator} --out {cfg.out}")


# --------------------------------------------------------------------------- the defaults, with seeds

def defaults_config(task: str, seed: int):
    """`mezo-vllm tune --task TASK --seed SEED` as a user runs it (every other setting the
    library's default); generation tasks evaluate 50 dev examples (greedy answers are slow)."""
    from mezo_vllm.config import TuneConfig

    extra = dict(eval_examples=50) if task in ("squad", "drop") else {}
    return TuneConfig(out=str(OUT / f"{task}-defaults-s{seed}"), task=task, seed=seed, **extra)


def _zero_shot(engine: Any, task: str, split: Any) -> dict[str, Any]:
    """The base model's test metric (results/TASK-zero-shot.json), measured once per task."""
    zero = _load(f"{task}-zero-shot") or {"zero_shot": _metric(engine, split, None),
                                           "test_examples": len(split.by_example)}
    _save(f"{task}-zero-shot", zero)
    return zero


@main.command("zero-shot")
@click.option("--task", "tasks", multiple=True, type=click.Choice(TASKS), required=True)
def zero_shot(tasks: Sequence[str]) -> None:
    """The base model's test metric, in the engine `defaults` scores with (e.g. for a task whose
    runs of the defaults came from examples/study.py)."""
    from mezo_vllm.platform_policy import engine_dtype

    engine = _engine(1, engine_dtype("auto", "vllm"))
    for task in tasks:
        click.echo(f"{task}: zero-shot {_zero_shot(engine, task, _test_split(task, engine.tokenizer))['zero_shot']:.4f}")


@main.command()
@click.option("--task", "tasks", multiple=True, type=click.Choice(TASKS), required=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="comma-separated seeds")
def defaults(tasks: Sequence[str], seeds: str) -> None:
    """MeZO-LoRA with the library's defaults, per task and seed, on one engine: zero-shot and the
    final adapter's test metric. A run interrupted (Ctrl-C) resumes at the next call; runs
    scored already are skipped."""
    from mezo_vllm.config import TuneConfig
    from mezo_vllm.platform_policy import engine_dtype
    from mezo_vllm.trainer import tune

    engine = _engine(TuneConfig(out="").directions, engine_dtype("auto", "vllm"))
    for task in tasks:
        split = _test_split(task, engine.tokenizer)
        zero = _zero_shot(engine, task, split)
        for seed in (int(x) for x in seeds.split(",")):
            name = f"{task}-defaults-s{seed}"
            if "test" in (_load(name) or {}):
                continue
            cfg = defaults_config(task, seed)
            summary = tune(cfg, resume=(Path(cfg.out) / "config.json").exists(), engine=engine)
            record = {"task": task, "seed": seed, "steps": cfg.steps, "train_s": summary["wall_s"],
                      "dev": summary["after"], "test": _score_adapter(engine, split, Path(cfg.out) / "adapter"),
                      "test_examples": len(split.by_example), "command": f"mezo-vllm tune --task {task} --seed {seed}"}
            _save(name, record)
            click.echo(f"{name}: zero-shot {zero['zero_shot']:.4f}, MeZO-LoRA {record['test']:.4f}")


STUDY_DEFAULTS = "review-n4-norm-25-lr-8e-3"  # examples/study.py's setting equal to `tune --task sst2`


@dataclasses.dataclass
class DefaultsRow:
    """One task's measurements of the defaults, a value per seed."""

    task: str
    examples: int
    zero_shot: float | None
    final: list[float]
    best: list[float]
    minutes: list[float]
    first_order: list[float]
    first_order_minutes: list[float]  # training time a run, model load excluded
    first_order_steps: list[int]  # the step budgets of its runs (one, unless they differ)


def defaults_rows(results: Path, study: Path) -> list[DefaultsRow]:
    """Each task's runs of the defaults: `defaults`' results and `score-run`'s best/ scores in
    `results`. SST-2's are the study's runs of the same setting (`study`/STUDY_DEFAULTS-s*.json),
    which were run before the `defaults` command existed."""
    rows = []
    for task in TASKS:
        if task == "sst2":
            runs = [r for r in map(_json, sorted(study.glob(f"{STUDY_DEFAULTS}-s*.json"))) if r.get("status") == "done"]
            final, best = [r["test_accuracy"] for r in runs], [r["test_accuracy_best"] for r in runs]
            minutes = [r["wall_s"] / 60 for r in runs]
        else:
            runs = [r for r in map(_json, sorted(results.glob(f"{task}-defaults-s*.json"))) if "test" in r]
            final, minutes = [r["test"] for r in runs], [r["train_s"] / 60 for r in runs]
            scored = [results / f"{task}-defaults-s{r['seed']}-scored.json" for r in runs]
            best = [_json(path)["test_best"] for path in scored if path.exists()]
        if not runs:
            continue
        zero = results / f"{task}-zero-shot.json"
        first = [r for r in map(_json, sorted(results.glob(f"{_first_order_name(task, None)}*.json"))) if "test" in r]
        rows.append(DefaultsRow(task, runs[0]["test_examples"], _json(zero)["zero_shot"] if zero.exists() else None,
                                final, best, minutes, [r["test"] for r in first], [r["train_s"] / 60 for r in first],
                                sorted({r["steps"] for r in first})))
    return rows


def _spread(values: Sequence[float], scale: float = 100.0) -> str:
    """mean ± std over seeds; the mean alone for one seed."""
    if not values:
        return "—"
    mean = f"{np.mean(values) * scale:.1f}"
    return mean + (f" ± {np.std(values, ddof=1) * scale:.1f}" if len(values) > 1 else "")


def defaults_table(rows: Sequence[DefaultsRow]) -> str:
    lines = ["| task | metric | test examples | zero-shot | MeZO-LoRA, defaults: final | best/ | seeds | "
             "wall time a run | first-order LoRA (seeds; steps, wall time a run) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        best = _spread(row.best) + (f" ({len(row.best)} seeds)" if len(row.best) != len(row.final) else "")
        steps = "/".join(map(str, row.first_order_steps))
        first = (f"{_spread(row.first_order)} ({len(row.first_order)}; {steps} steps, "
                 f"{_spread(row.first_order_minutes, 1.0)} min)" if row.first_order else "—")
        lines.append(f"| {row.task} | {_metric_name(row.task)} | {row.examples} | {_fmt(row.zero_shot)} | "
                     f"**{_spread(row.final)}** | {best} | {len(row.final)} | {_spread(row.minutes, 1.0)} min | "
                     f"{first} |")
    return "\n".join(lines)


def plot_defaults(rows: Sequence[DefaultsRow], dest: Path) -> None:
    """Bars of the means, a dot per seed: what the defaults add to zero-shot on each task, and how
    far first-order LoRA goes where it was run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    kinds = [("zero-shot", "lightgrey", lambda r: [r.zero_shot] if r.zero_shot is not None else []),
             ("MeZO-LoRA, defaults (final)", "tab:blue", lambda r: r.final),
             ("MeZO-LoRA, defaults (best/)", "lightsteelblue", lambda r: r.best),
             ("first-order LoRA", "tab:orange", lambda r: r.first_order)]
    width = 0.8 / len(kinds)
    for k, (label, color, values_of) in enumerate(kinds):
        for i, row in enumerate(rows):
            values = np.array(values_of(row)) * 100
            if not len(values):
                continue
            x = i + (k - (len(kinds) - 1) / 2) * width
            ax.bar(x, values.mean(), width, color=color, label=label,
                   yerr=values.std(ddof=1) if len(values) > 1 else None, capsize=3)
            ax.plot([x] * len(values), values, "k.", markersize=4)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper center", ncols=len(unique))
    ax.set_xticks(range(len(rows)), [f"{r.task} ({_metric_name(r.task)}, {len(r.final)} seed"
                                     f"{'s' if len(r.final) > 1 else ''})" for r in rows])
    ax.set(ylim=(0, 115), ylabel="test metric (%): mean ± std, a dot per seed",
           title="The defaults (`mezo-vllm tune --task T`) on each task")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- first-order LoRA

def _column_sums(body: Any, lm_head: Any, requests: Sequence[Any]) -> Any:
    """Summed target log-prob of every scored column (as `engine.score` returns them), with
    gradients: one padded forward pass of the requests (options that differ in their last
    token share one request), the lm_head on the target rows only."""
    import torch

    width = max(len(r.token_ids) for r in requests)
    ids = torch.zeros(len(requests), width, dtype=torch.long)
    mask = torch.zeros(len(requests), width, dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, : len(r.token_ids)] = torch.tensor(r.token_ids)
        mask[i, : len(r.token_ids)] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        index = torch.tensor([i for i, r in enumerate(requests) for _ in range(r.n_targets)])
        position = torch.tensor([p for r in requests for p in range(r.span_start - 1, len(r.token_ids) - 1)])
        logits = lm_head(hidden[index, position])
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out, start = [], 0
    for r in requests:
        rows = logprobs[start : start + r.n_targets]
        out.append(rows.gather(-1, torch.tensor(r.candidates)).sum(0))
        start += r.n_targets
    return torch.cat(out)


@main.command("first-order")
@click.option("--task", type=click.Choice(TASKS), required=True)
@click.option("--steps", type=int, help="override the task's step budget (e.g. a quick check)")
@click.option("--out", "name", default=None, help="result name (default: TASK-first-order, -sSEED for seed ≠ 0)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the adapter's init and the batches")
@click.option("--model", "base", default=None, help="base model, as `tune --model` takes it (default: the embedded default; "
                                            "score another model's adapter with `mezo-vllm eval`)")
def first_order(task: str, steps: int | None, name: str | None, seed: int, base: str | None) -> None:
    """LoRA with Adam and backprop (transformers + PEFT), same adapter shape and objective."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mezo_vllm.data import CLASSIFICATION, load_task
    from mezo_vllm.model import resolve_model
    from mezo_vllm.objective import accuracy, batch_loss
    from mezo_vllm.data import Split
    from mezo_vllm.trainer import batch_examples

    budget, batch = FO[task]
    steps = steps or budget
    name = name or _first_order_name(task, base) + (f"-s{seed}" if seed else "")
    model_dir = str(resolve_model(base).resolve())
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=COMMON["rank"], lora_alpha=COMMON["alpha"], lora_dropout=0.0,
                                             target_modules=list(COMMON["targets"])))
    body, lm_head = model.base_model.model.model, model.base_model.model.lm_head
    splits = load_task(task)
    train = Split.make(splits.train, tokenizer, 1024, "truncate")
    dev = Split.make(splits.dev, tokenizer, 1024, "truncate")
    keep = sorted(dev.by_example)[:FO_DEV]
    dev = Split(dev.dataset, dev.requests_of(keep), {i: dev.by_example[i] for i in keep})
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=FO_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / steps)
    examples = sorted(train.by_example)
    curve = []

    def dev_metric(step: int) -> None:
        if dev.dataset.kind != CLASSIFICATION:
            return
        with torch.no_grad():
            sums = torch.cat([_column_sums(body, lm_head, dev.requests[i : i + 32])
                              for i in range(0, len(dev.requests), 32)])
        curve.append({"step": step, "accuracy": accuracy(dev.dataset.examples, dev.requests, sums),
                      "wall_s": time.perf_counter() - t0})
        click.echo(f"step {step}: dev accuracy {curve[-1]['accuracy']:.4f}")

    t0 = time.perf_counter()
    dev_metric(0)
    for step in range(steps):
        requests = train.requests_of(batch_examples(seed, step, examples, batch))
        loss = batch_loss(train.dataset.examples, train.dataset.kind, requests,
                          _column_sums(body, lm_head, requests))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(steps // (6 if task == "sst2" else 2), 1) == 0 or step + 1 == steps:
            dev_metric(step + 1)
    train_s = time.perf_counter() - t0
    folder = OUT / name
    model.save_pretrained(str(folder / "adapter"))
    _save(name, {"steps": steps, "batch_size": batch, "lr": FO_LR, "seed": seed, "train_s": train_s,
                 "peak_rss_gib": _peak_rss_gib(), "curve": curve,
                 "command": f"python examples/quality.py first-order --task {task} --seed {seed}"
                            + (f" --model {base}" if base else "")})
    click.echo(f"{task}: first-order LoRA {steps} steps in {train_s:.0f} s, peak RSS {_peak_rss_gib():.2f} GiB")


@main.command("eval-first-order")
@click.option("--task", "tasks", multiple=True, type=click.Choice(TASKS), default=TASKS)
@click.option("--model", "base", default=None, help="the base model the adapters were trained on "
                                                    "(as `first-order --model` took it; default: the embedded default)")
def eval_first_order(tasks: Sequence[str], base: str | None) -> None:
    """The first-order adapters (every seed's) on the test split, in the engine that scores the others."""
    engine = _engine(base=base)
    for task in tasks:
        names = sorted(p.stem for p in (OUT / "results").glob(f"{_first_order_name(task, base)}*.json"))
        if not names:
            click.echo(f"{task}: no first-order run yet")
            continue
        split = _test_split(task, engine.tokenizer)
        for name in names:
            record = _load(name)
            record["test"] = _score_adapter(engine, split, OUT / name / "adapter")
            _save(name, record)
            click.echo(f"{name}: first-order LoRA {record['test']:.4f}")


@main.command("score-run")
@click.option("--task", required=True, type=click.Choice(TASKS))
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
def score_run(task: str, runs: Sequence[Path]) -> None:
    """The test metric of any `tune` run's adapters, the final one and `best/` (e.g. a run
    with a setting other than the defaults, or one stopped early): results/<run name>-scored.json."""
    from mezo_vllm.platform_policy import engine_dtype

    engine = _engine(1, engine_dtype("auto", "vllm"))
    split = _test_split(task, engine.tokenizer)
    for run in runs:
        config = json.loads((run / "config.json").read_text())
        record = {"task": task, "run": str(run), "test_examples": len(split.by_example),
                  "settings": {k: config[k] for k in ("lr", "directions", "steps", "seed")},
                  "dev": _metrics(run)}
        for adapter in ("adapter", "best"):
            if (run / adapter).is_dir():
                record[f"test_{adapter}"] = _score_adapter(engine, split, run / adapter)
        _save(f"{run.name}-scored", record)
        click.echo(f"{run.name}: " + ", ".join(f"{k} {record[k]:.4f}" for k in ("test_adapter", "test_best") if k in record))


# --------------------------------------------------------------------------- report

def _fmt(value: float | None, scale: float = 100.0) -> str:
    return "—" if value is None or value != value else f"{value * scale:.1f}"


def _metric_name(task: str) -> str:
    return "F1" if task in ("squad", "drop") else "accuracy"


def _minutes(seconds: float | None) -> str:
    return "—" if seconds is None or seconds != seconds else f"{seconds / 60:.1f} min"


def table() -> str:
    rows = ["| task | metric | test examples | zero-shot | MeZO-LoRA (steps, wall time) | first-order LoRA "
            "(steps, wall time, peak RSS) |", "|---|---|---|---|---|---|"]
    for task in TASKS:
        mezo, fo = _load(f"{task}-mezo") or {}, _load(_first_order_name(task, None)) or {}
        metric = _metric_name(task)
        mezo_cell = (f"{_fmt(mezo.get('mezo'))} ({mezo['steps']}, {_minutes(mezo.get('train_s'))})"
                     if "mezo" in mezo else "—")
        fo_cell = (f"{_fmt(fo.get('test'))} ({fo['steps']}, {_minutes(fo['train_s'])}, {fo['peak_rss_gib']:.2f} GiB)"
                   if "test" in fo else "—")
        rows.append(f"| {task} | {metric} | {mezo.get('test_examples', '—')} | {_fmt(mezo.get('zero_shot'))} | "
                    f"{mezo_cell} | {fo_cell} |")
    return "\n".join(rows)


def _metric_lines(run: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl, also while it runs (a torn last line is left out)."""
    from mezo_vllm.rundir import read_log

    return read_log(run / "metrics.jsonl")[0]


def _metrics(run: Path) -> list[dict[str, Any]]:
    """The dev lines of a run's metrics.jsonl (the train lines are the others)."""
    from mezo_vllm.outputs import dev_lines

    return dev_lines(_metric_lines(run))


def plot_sst2_curves(dest: Path) -> None:
    mezo = _metrics(OUT / "sst2-mezo")
    if not mezo:
        return  # the run is not on this disk: keep the plot drawn from it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([max(m["step"], 1) for m in mezo], [m["accuracy"] for m in mezo], marker="o",
            label=f"MeZO-LoRA (bf16 vLLM, {mezo[-1]['wall_s'] / 60:.0f} min)")
    first = _load(_first_order_name("sst2", None)) or {}
    if first.get("curve"):
        ax.plot([max(c["step"], 1) for c in first["curve"]], [c["accuracy"] for c in first["curve"]], marker="s",
                label=f"first-order LoRA (Adam, transformers+PEFT, {first['train_s'] / 60:.0f} min)")
    ax.set(xscale="log", xlabel="step (log scale; step 0 drawn at 1)", ylabel="SST-2 dev accuracy (100 examples)",
           title="SST-2: MeZO-LoRA vs first-order LoRA")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


ESTIMATOR_RUNS = {"ZO-SGD": "sst2-mezo", "ZO-SGD + momentum (β 0.9, window 16)": "est-momentum",
                  "LOZO (rank 2, period 50)": "est-lozo", "4-SPSA (4 directions)": "est-spsa4"}


def estimator_config(name: str):
    """The comparison runs: SST-2's MeZO settings (3000-step schedule), each run for the same
    wall time (`timeout -s INT`), only the update rule changed."""
    options = {"est-momentum": dict(estimator="momentum"), "est-lozo": dict(estimator="lozo"),
               "est-spsa4": dict(directions=4, eval_every=60, save_every=60)}[name]  # 4× the cost per step
    return mezo_config("sst2", OUT / name, **options)


@main.command()
@click.option("--name", type=click.Choice(["est-momentum", "est-lozo", "est-spsa4"]), required=True)
@click.option("--seconds", type=float, default=300, show_default=True)
def estimator(name: str, seconds: float) -> None:
    """One estimator-comparison run, stopped after `seconds` of wall time (it stays resumable)."""
    import signal
    import threading

    from mezo_vllm.trainer import TrainingStopped, tune

    cfg = estimator_config(name)
    timer = threading.Timer(seconds, lambda: signal.raise_signal(signal.SIGINT))
    timer.daemon = True
    timer.start()
    try:  # tune starts its own engine, so wall_s counts its start as the CLI run's does
        tune(cfg, resume=(Path(cfg.out) / "config.json").exists())
    except TrainingStopped as e:
        click.echo(f"stopped: {e}")


def plot_estimators(dest: Path, limit_s: float) -> None:
    from mezo_vllm.outputs import is_train_line

    if not any(_metrics(OUT / name) for name in ESTIMATOR_RUNS.values()):
        return  # the runs are not on this disk: keep the plot drawn from them
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(12, 4))
    for label, name in ESTIMATOR_RUNS.items():
        metrics = _metrics(OUT / name)
        points = [m for m in metrics if m["wall_s"] <= limit_s]
        if not points:
            continue
        line, = ax.plot([m["wall_s"] / 60 for m in points], [m["accuracy"] for m in points], marker="o", label=label)
        # the training loss (the mean of all the step's losses: 2n of them for n directions)
        # between evaluations, its time interpolated from theirs
        steps = [r for r in _metric_lines(OUT / name) if is_train_line(r) and r["train_loss"] is not None]
        loss = np.array([r["train_loss"] for r in steps])
        when = np.interp([r["step"] for r in steps], [m["step"] for m in metrics],
                         [m["wall_s"] for m in metrics])
        smooth = np.convolve(loss, np.ones(25) / 25, mode="valid")
        done = np.array([r["step"] for r in steps])[24:]
        keep = (when[24:] <= limit_s) & (done <= metrics[-1]["step"])  # no time known past the last eval
        ax_loss.plot(when[24:][keep] / 60, smooth[keep], color=line.get_color(), label=label)
    ax.set(xlabel="wall time (min, engine start included)", ylabel="SST-2 dev accuracy (100 examples)",
           title="Update rules on SST-2 (bf16 engine, same lr/ε/batch)")
    ax_loss.set(xlabel="wall time (min)", ylabel="training loss (25-step moving average)",
                title="training loss")
    for a in (ax, ax_loss):
        a.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


@main.command()
@click.option("--docs", type=click.Path(), default="docs", show_default=True)
@click.option("--estimator-minutes", type=float, default=5.0, show_default=True)
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=OUT / "results",
              show_default=True, help="the `defaults`, `score-run` and `first-order` result files")
@click.option("--study", type=click.Path(file_okay=False, path_type=Path), default=Path("docs/study"),
              show_default=True, help="examples/study.py's results (SST-2's runs of the defaults)")
def report(docs: str, estimator_minutes: float, results: Path, study: Path) -> None:
    """The markdown tables (runs/quality/table.md), docs/quality-defaults.png,
    docs/quality-sst2-curves.png and docs/estimators-sst2.png."""
    Path(docs).mkdir(exist_ok=True)
    rows = defaults_rows(results, study)
    text = table() + "\n\n" + defaults_table(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "table.md").write_text(text + "\n")
    if rows:
        plot_defaults(rows, Path(docs) / "quality-defaults.png")
    plot_sst2_curves(Path(docs) / "quality-sst2-curves.png")
    plot_estimators(Path(docs) / "estimators-sst2.png", estimator_minutes * 60)
    click.echo(text)


@main.command("all")
def all_() -> None:
    """Every stage, each in its own process (peak memory per process), then the report."""
    me = [sys.executable, __file__]
    subprocess.run([*me, "mezo"], check=True)
    for task in TASKS:
        subprocess.run([*me, "first-order", "--task", task], check=True)
    subprocess.run([*me, "eval-first-order"], check=True)
    for name in ("est-momentum", "est-lozo", "est-spsa4"):
        subprocess.run([*me, "estimator", "--name", name], check=True)
    subprocess.run([*me, "report"], check=True)


if __name__ == "__main__":
    main()
