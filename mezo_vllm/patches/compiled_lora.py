"""Compiled CPU forward passes with LoRA enabled (vLLM 0.32.0).

Upstream: `CpuPlatform.check_and_update_config` (`platforms/cpu.py`) compiles the model with
Dynamo + Inductor (`CompilationMode.DYNAMO_TRACE_ONCE`: one trace, no guards, a dynamic token
count), except when LoRA is enabled: then it sets `CompilationMode.NONE` and the model runs
eagerly, every RMSNorm, rotary embedding and SiLU·mul as a chain of unfused element-wise ops.
The reason is the CPU punica wrapper: its LoRA ops branch on Python values (`no_lora`, the
segments' `.tolist()`), which a single trace without guards would freeze at their warm-up
values.

Change: the CPU LoRA linear and embedding ops become opaque custom ops
(`mezo_vllm::cpu_lora_linear`, `mezo_vllm::cpu_lora_embedding`): Dynamo records a call, never
their data-dependent Python, and they read the step's token → slot mapping from the wrapper's
persistent buffer (`_token_lora_indices`, rewritten in place before every step) inside the op,
so the compiled graph serves every batch. Their bodies are `fast_cpu_lora`'s (one matmul per
adapter segment, slices whose B is zero skipped). And `check_and_update_config` runs with the
LoRA config hidden from it, so the compilation it would choose without LoRA stays on; only when
`ENV` is "1" (the engine sets it for engines that ask for compilation), so a `vllm serve` on the
same install keeps upstream's behaviour.

Written for vLLM 0.32.0.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from . import check_version, fast_cpu_lora, mark_applied

SUPPORTED = ("0.32.0",)
NAME = "compiled_lora"
ENV = "MEZO_VLLM_COMPILE_LORA"


@torch.library.custom_op("mezo_vllm::cpu_lora_linear", mutates_args=("y",))
def cpu_lora_linear(y: Tensor, x: Tensor, lora_a: list[Tensor], lora_b: list[Tensor], scale: float,
                    output_slices: list[int], token_slots: Tensor) -> None:
    """`PunicaWrapperCPU.add_lora_linear`'s arithmetic for the first x.shape[0] tokens."""
    segs = fast_cpu_lora.token_segments(token_slots[: x.shape[0]])
    fast_cpu_lora.add_lora_linear(y, x, tuple(lora_a), tuple(lora_b), scale, tuple(output_slices), segs)


@cpu_lora_linear.register_fake
def _(y: Tensor, x: Tensor, lora_a: list[Tensor], lora_b: list[Tensor], scale: float,
      output_slices: list[int], token_slots: Tensor) -> None:
    return None


@torch.library.custom_op("mezo_vllm::cpu_lora_embedding", mutates_args=("y",))
def cpu_lora_embedding(y: Tensor, x: Tensor, lora_b: Tensor, token_slots: Tensor, add_inputs: bool) -> None:
    """`PunicaWrapperCPU.add_lora_embedding` (expand only) for the first x.shape[0] tokens,
    skipping slots whose B is zero."""
    live = fast_cpu_lora.live_slots(lora_b)
    segs = [s for s in fast_cpu_lora.token_segments(token_slots[: x.shape[0]]) if live[s[2]]]
    fast_cpu_lora.expand(y.view(-1, y.shape[-1]), x, lora_b, segs, add_inputs)


@cpu_lora_embedding.register_fake
def _(y: Tensor, x: Tensor, lora_b: Tensor, token_slots: Tensor, add_inputs: bool) -> None:
    return None


def _add_lora_linear(self: Any, y: Tensor, x: Tensor, lora_a_stacked: tuple[Tensor, ...],
                     lora_b_stacked: tuple[Tensor, ...], scale: float, output_slices: tuple[int, ...],
                     **kwargs: Any) -> None:
    torch.ops.mezo_vllm.cpu_lora_linear(y, x.view(-1, x.shape[-1]), list(lora_a_stacked), list(lora_b_stacked),
                                        scale, list(output_slices), self._token_lora_indices)


def _add_lora_embedding(self: Any, y: Tensor, x: Tensor, lora_b_stacked: Tensor, add_inputs: bool = True,
                        **kwargs: Any) -> None:
    torch.ops.mezo_vllm.cpu_lora_embedding(y, x, lora_b_stacked, self._token_lora_indices, add_inputs)


def _compile_with_lora(original: Any) -> Any:
    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        lora = vllm_config.lora_config
        if lora is None or os.environ.get(ENV) != "1":
            return original.__func__(cls, vllm_config)
        vllm_config.lora_config = None  # upstream's only use of it here is to turn compilation off
        try:
            original.__func__(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora

    return classmethod(check_and_update_config)


def apply() -> None:
    check_version(NAME, SUPPORTED)
    fast_cpu_lora.apply()
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.platforms.cpu import CpuPlatform

    if mark_applied(PunicaWrapperCPU, NAME):
        PunicaWrapperCPU.add_lora_linear = _add_lora_linear
        PunicaWrapperCPU.add_lora_embedding = _add_lora_embedding
    if mark_applied(CpuPlatform, NAME):
        CpuPlatform.check_and_update_config = _compile_with_lora(CpuPlatform.__dict__["check_and_update_config"])
