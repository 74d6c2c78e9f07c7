"""Fast LoRA on the CPU backend: one matmul per adapter segment, not a weight copy per token.

Upstream: the V1 runner always runs LoRA in "prefill" mode (`LoRAMapping(is_prefill=True)` in
`v1/worker/lora_model_runner_mixin.py`), so `PunicaWrapperCPU` calls the torch ops
`sgmv_shrink` / `sgmv_expand` / `sgmv_expand_slice` (`lora/ops/torch_ops/lora_ops.py`). These
expand the per-segment slot indices back to one per token (`repeat_interleave`), gather a copy
of the adapter weights for every token (`weights[indices]`: [tokens, out, in]) and contract
them with a batched `einsum`: for a 135M model that makes LoRA scoring ~6× slower than the
base model (DESIGN.md). A token without an adapter (slot -1) reads the *last* slot's weights.

Change: `PunicaWrapperCPU._shrink_*`, `_expand_*` and `_expand_slice_*` (prefill and decode)
walk the contiguous segments of tokens that share a slot (prefill: from `prefill_metadata`,
which upstream already computes; decode: from `token_lora_indices`) and do one plain matmul per
segment with that slot's weights, skipping segments without an adapter (slot -1: their rows are
left as they are). Segments are not merged per slot: mezo-vllm orders requests variant-major,
so each slot is one segment. The semantics are upstream's: shrink overwrites `y[:, :r]` with
`scale · x Aᵀ`; expand adds to (or overwrites) `y[:, :min(out, y.cols)]`, expand_slice
`y[:, offset:offset+size]`, computed in y's dtype. Two numerical differences, both deliberate:

- shrink runs its GEMM in the inputs' dtype (fp32 accumulation), where upstream first copies x
  to its fp32 buffer's dtype. The buffer's only reader is expand, which casts it to the layer's
  dtype before using it, so expand sees the same values (up to summation order); the fp32 copy
  of x per slice was ~60% of the LoRA time in bf16. For an fp32 model nothing changes.
- expand adds inside the GEMM (`addmm_`: half the memory traffic): in bf16 that rounds once
  where upstream rounds the product and then the sum.

So fp32 results equal upstream's up to summation order, bf16 ones to about one bf16 ulp.

`add_lora_linear` (what every LoRA linear layer calls) also skips a slice in a slot whose B is
all zeros: vLLM wraps every supported linear layer (qkv_proj, o_proj, gate_up_proj, down_proj)
whatever the adapter targets, and an adapter on q_proj/v_proj leaves 5 of those 7 slices zero
in every slot. Which slots are zero is recomputed only when a slot is written (the stacked
tensor's version counter, which vLLM's in-place `set_lora`/`reset_lora` bump).

Written for vLLM 0.32.0.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from . import check_version, mark_applied, RUNNERS, Scope

SUPPORTED = ("0.32.0",)
NAME = "fast_cpu_lora"
SCOPE = Scope(
    targets=(*(f"vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU._{op}_{mode}"
               for op in ("shrink", "expand", "expand_slice") for mode in ("prefill", "decode")),
             "vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU.add_lora_linear"),
    platforms=("cpu",), runners=RUNNERS,  # the CPU platform picks PunicaWrapperCPU, either runner
)

Segments = list[tuple[int, int, int]]  # (first row, rows, slot) with slot ≥ 0


def segments(starts: Tensor, lengths: Tensor, slots: Tensor) -> Segments:
    """The segments that have an adapter, as Python ints."""
    return [
        (s, n, slot)
        for s, n, slot in zip(starts.tolist(), lengths.tolist(), slots.tolist())
        if slot >= 0
    ]


def token_segments(token_slots: Tensor) -> Segments:
    """Group consecutive tokens with the same slot (what `compute_meta` does for prefill)."""
    slots, lengths = torch.unique_consecutive(token_slots, return_counts=True)
    return segments(torch.cumsum(lengths, 0) - lengths, lengths, slots)


def _weight(stacked: Tensor, slot: int) -> Tensor:
    w = stacked[slot]  # [1, out, in] (vLLM's stacked layout) or [out, in]
    return w[0] if w.dim() == 3 else w


def shrink(y: Tensor, x: Tensor, w: Tensor, segs: Segments, scale: float) -> None:
    """y[rows, :r] = scale · x[rows] Aₛᵀ for each segment (rows, slot s).

    The GEMM runs in the wider of x's and A's dtypes (fp32 accumulation), not in y's: see the
    module docstring for why expand then sees upstream's values.
    """
    for start, n, slot in segs:
        a = _weight(w, slot)
        dtype = torch.promote_types(x.dtype, a.dtype)
        out = x[start : start + n].to(dtype) @ a.to(dtype).T
        y[start : start + n, : a.shape[0]] = out.to(y.dtype) * scale


def expand_slice(
    y: Tensor, x: Tensor, w: Tensor, segs: Segments, offset: int, size: int, add_inputs: bool
) -> None:
    """y[rows, offset:offset+size] (+)= x[rows] Bₛᵀ for each segment (rows, slot s), y's dtype."""
    for start, n, slot in segs:
        b = _weight(w, slot)[:size].to(y.dtype)
        rows = x[start : start + n].to(y.dtype)
        dst = y[start : start + n, offset : offset + b.shape[0]]
        if add_inputs:
            dst.addmm_(rows, b.T)  # in the GEMM: half the memory traffic of `dst += rows @ b.T`
        else:
            dst.copy_(rows @ b.T)


def expand(y: Tensor, x: Tensor, w: Tensor, segs: Segments, add_inputs: bool) -> None:
    """Upstream's expand: the first min(out, y.cols) columns of y (LoRA B may be padded)."""
    expand_slice(y, x, w, segs, 0, y.shape[1], add_inputs)


_live: dict[int, tuple[int, int, list[bool]]] = {}  # id → (data_ptr, version, slot has B ≠ 0)


def live_slots(stacked: Tensor) -> list[bool]:
    """Per slot: is any weight non-zero? Cached until the tensor is written again."""
    key, state = id(stacked), (stacked.data_ptr(), stacked._version)
    cached = _live.get(key)
    if cached is None or cached[:2] != state:
        cached = (*state, stacked.flatten(1).any(1).tolist())
        _live[key] = cached
    return cached[2]


def add_lora_linear(y: Tensor, x: Tensor, lora_a: tuple[Tensor, ...], lora_b: tuple[Tensor, ...],
                    scale: float, output_slices: tuple[int, ...], segs: Segments) -> None:
    """y[rows, slice i] += scale · x[rows] Aᵢₛᵀ Bᵢₛᵀ per segment (rows, slot s) and slice i,
    with upstream's fp32 intermediate; slices whose B is zero in slot s are skipped."""
    y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
    offset = 0
    for a_all, b_all, size in zip(lora_a, lora_b, output_slices):
        live = live_slots(b_all)
        for start, n, slot in segs:
            if not live[slot]:
                continue
            buffer = torch.empty(n, a_all.shape[-2], dtype=torch.float32)
            shrink(buffer, x2[start : start + n], a_all[slot : slot + 1], [(0, n, 0)], scale)
            expand_slice(y2[start : start + n], buffer, b_all[slot : slot + 1], [(0, n, 0)], offset, size, True)
        offset += size


def _prefill(self: Any) -> Segments:
    starts, lengths, slots = self.prefill_metadata[:3]
    return segments(starts, lengths, slots)


def _decode(self: Any) -> Segments:
    return token_segments(self.token_lora_indices)


def _methods(segs_of: Callable[[Any], Segments]) -> dict[str, Callable[..., None]]:
    """PunicaWrapperCPU's `_shrink_*`, `_expand_*`, `_expand_slice_*`, same signatures."""

    def _shrink(self: Any, y: Tensor, x: Tensor, w_t_all: Tensor, scale: float) -> None:
        shrink(y, x, w_t_all, segs_of(self), scale)

    def _expand(self: Any, y: Tensor, x: Tensor, w_t_all: Tensor, add_inputs: bool) -> None:
        expand(y, x, w_t_all, segs_of(self), add_inputs)

    def _expand_slice(
        self: Any, y: Tensor, x: Tensor, w_t_all: Tensor, y_offset: int, y_slice_size: int,
        add_inputs: bool,
    ) -> None:
        expand_slice(y, x, w_t_all, segs_of(self), y_offset, y_slice_size, add_inputs)

    return {"shrink": _shrink, "expand": _expand, "expand_slice": _expand_slice}


def _add_lora_linear(self: Any, y: Tensor, x: Tensor, lora_a_stacked: tuple[Tensor, ...],
                     lora_b_stacked: tuple[Tensor, ...], scale: float, output_slices: tuple[int, ...],
                     **kwargs: Any) -> None:
    """PunicaWrapperCPU.add_lora_linear's signature (its `buffer` is not needed)."""
    if self.no_lora:
        return
    add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                    _prefill(self) if self.is_prefill else _decode(self))


def apply() -> None:
    check_version(NAME, SUPPORTED)
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    if mark_applied(PunicaWrapperCPU, NAME):
        for mode, segs_of in (("prefill", _prefill), ("decode", _decode)):
            for op, method in _methods(segs_of).items():
                setattr(PunicaWrapperCPU, f"_{op}_{mode}", method)
        PunicaWrapperCPU.add_lora_linear = _add_lora_linear
