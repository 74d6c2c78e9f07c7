"""Where each patch's target runs: the platforms and model runners that call it (vLLM 0.32.0).

A patch applied where its target never runs fails silently: the engine takes upstream's slow
path, or on CUDA's V2 runner the span patch waits for a hook that is never called. Each patch
therefore declares the code it replaces and where that code is called; `applies()` tells the
engine which patches to apply (and which scoring hook to expect). tests/test_gpu_path.py checks
every declaration against the installed vLLM sources, so a vLLM upgrade that moves a call site
fails there. (Paths relative to the `vllm` package.)

- V1 runner only: `GPUModelRunner._get_prompt_logprobs_dict` is called from
  `_bookkeeping_sync` (v1/worker/gpu_model_runner.py:3589); V2's `GPUModelRunner`
  (v1/worker/gpu/model_runner.py:193) is not its subclass and scores prompts in
  `PromptLogprobsWorker` (:2150-2166).
- CPU only: the platform picks the LoRA kernels' wrapper, `PunicaWrapperCPU` on CPU
  (platforms/cpu.py:606-607), `PunicaWrapperGPU` on CUDA and ROCm (platforms/cuda.py:575-576,
  rocm.py:1162-1163), for either runner; the LoRA layers call it (lora/layers/). And
  `CpuPlatform.check_and_update_config` is the CPU platform's, called from `VllmConfig`.
- Everywhere: `KVCacheManager.get_computed_blocks` is the scheduler's (v1/core/sched/
  scheduler.py:566,1037), which is the same for both runners.
"""

from __future__ import annotations

from dataclasses import dataclass

PLATFORMS = ("cpu", "cuda", "rocm")
RUNNERS = ("v1", "v2")

V1_PROMPT_LOGPROBS = "vllm.v1.worker.gpu_model_runner:GPUModelRunner._get_prompt_logprobs_dict"
CPU_PUNICA = "vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU"
CPU_PLATFORM = "vllm.platforms.cpu:CpuPlatform"
GET_COMPUTED_BLOCKS = "vllm.v1.core.kv_cache_manager:KVCacheManager.get_computed_blocks"


@dataclass(frozen=True)
class Scope:
    """The attributes a patch replaces ("module:Class.attr") and where they are called."""

    targets: tuple[str, ...]
    platforms: tuple[str, ...]
    runners: tuple[str, ...]


SCOPES: dict[str, Scope] = {
    "lora_prompt_logprobs": Scope(
        (f"{CPU_PUNICA}.add_lora_logits", V1_PROMPT_LOGPROBS), ("cpu",), ("v1",)
    ),
    "fast_cpu_lora": Scope(
        (*(f"{CPU_PUNICA}._{op}_{mode}" for op in ("shrink", "expand", "expand_slice")
           for mode in ("prefill", "decode")), f"{CPU_PUNICA}.add_lora_linear"),
        ("cpu",), RUNNERS,
    ),
    "compiled_lora": Scope(
        (f"{CPU_PUNICA}.add_lora_linear", f"{CPU_PUNICA}.add_lora_embedding",
         f"{CPU_PLATFORM}.check_and_update_config"),
        ("cpu",), RUNNERS,
    ),
    "span_logprobs": Scope((V1_PROMPT_LOGPROBS,), PLATFORMS, ("v1",)),
    "prefix_sharing": Scope((GET_COMPUTED_BLOCKS,), PLATFORMS, RUNNERS),
}


def applies(patch: str, platform: str, runner: str) -> bool:
    """Whether `patch`'s targets run on `platform` with model runner `runner` ("v1"/"v2")."""
    scope = SCOPES[patch]
    return platform in scope.platforms and runner in scope.runners

