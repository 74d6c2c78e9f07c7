"""LoRA + prompt log-probs on the CPU backend (vLLM 0.32.0).

Upstream: with `enable_lora=True` the lm_head's logits processor is wrapped by
`LogitsProcessorWithLoRA`, which asks the punica wrapper to add the lm_head LoRA with
`add_lora_logits`. On CPU (`PunicaWrapperCPU`) that uses `sampler_indices`: one adapter slot per
*request*. Prompt log-probs (`GPUModelRunner._get_prompt_logprobs_dict`) call the same logits
processor on one row per *prompt token*, so any request with prompt log-probs crashes with
"einsum(): subscript b has size N for operand 1 which does not broadcast ...", with or without an
adapter. Rows that have no adapter (slot index -1) index the last slot's weights, so a batch that
mixes requests with and without an adapter would also be wrong once the shapes agree.

Change: while prompt log-probs are computed, each `compute_logits` call is told which rows of
the batch it covers, and `add_lora_logits` takes those rows' per-token slot indices
(`token_lora_indices`, the same ones the decoder layers use). `add_lora_logits` then adds the
LoRA with one matmul pair per slot present, skipping rows without an adapter and slots whose
lm_head LoRA is zero (adapters that do not target lm_head, the usual case). Everything else is
upstream's code. Other patches that call `compute_logits` on rows of the batch that are not
contiguous (`span_logprobs`: the target rows of every request at once) say which rows with
`batch_rows(index_tensor)`.

Written for vLLM 0.32.0.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from . import check_version, mark_applied, Scope

SUPPORTED = ("0.32.0",)
NAME = "lora_prompt_logprobs"
SCOPE = Scope(
    targets=("vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU.add_lora_logits",
             "vllm.v1.worker.gpu_model_runner:GPUModelRunner._get_prompt_logprobs_dict"),
    platforms=("cpu",), runners=("v1",),
)

# Which rows of the step's batch a `compute_logits` call covers: (first row, count) for a
# contiguous run, or a 1-D index tensor; None (the sampler's call) means one row per request.
_rows: contextvars.ContextVar[tuple[int, int] | torch.Tensor | None] = contextvars.ContextVar(
    "mezo_vllm_logits_rows", default=None
)


@contextmanager
def batch_rows(rows: tuple[int, int] | torch.Tensor) -> Iterator[None]:
    """`compute_logits` calls inside cover these rows of the step's batch (for the lm_head LoRA)."""
    token = _rows.set(rows)
    try:
        yield
    finally:
        _rows.reset(token)


def add_lora_per_slot(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
) -> None:
    """y[rows of slot s] += scale · x[rows] Aₛᵀ Bₛᵀ for every slot s ≥ 0 present in `indices`."""
    for slot in torch.unique(indices).tolist():
        if slot < 0:
            continue
        a = lora_a[slot, 0].to(torch.float32)
        b = lora_b[slot, 0].to(torch.float32)
        if not b.any():
            continue
        rows = (indices == slot).nonzero(as_tuple=True)[0]
        delta = (x.index_select(0, rows).to(torch.float32) @ a.T) * scale @ b.T
        y.index_add_(0, rows, delta[:, : y.shape[1]].to(y.dtype))


def _add_lora_logits(
    self: Any,
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: torch.Tensor,
    lora_b_stacked: torch.Tensor,
    scale: float,
    **kwargs: Any,
) -> None:
    rows = _rows.get()
    if rows is None:
        indices = self.sampler_indices
    elif isinstance(rows, torch.Tensor):
        indices = self.token_lora_indices[rows]
    else:
        start, count = rows
        indices = self.token_lora_indices[start : start + count]
    add_lora_per_slot(
        y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1]), lora_a_stacked, lora_b_stacked,
        indices, scale,
    )


def _wrap_prompt_logprobs(original: Any) -> Any:
    def _get_prompt_logprobs_dict(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        model = self.model
        compute_logits = model.compute_logits
        base, stride = hidden_states.storage_offset(), hidden_states.stride(0)

        def compute_logits_of_rows(rows_h: torch.Tensor, *a: Any, **k: Any) -> Any:
            start = (rows_h.storage_offset() - base) // stride
            with batch_rows((start, rows_h.shape[0])):
                return compute_logits(rows_h, *a, **k)

        model.compute_logits = compute_logits_of_rows
        try:
            return original(self, hidden_states, *args, **kwargs)
        finally:
            del model.compute_logits

    return _get_prompt_logprobs_dict


def apply() -> None:
    check_version(NAME, SUPPORTED)
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if mark_applied(PunicaWrapperCPU, NAME):
        PunicaWrapperCPU.add_lora_logits = _add_lora_logits
    if mark_applied(GPUModelRunner, NAME):
        GPUModelRunner._get_prompt_logprobs_dict = _wrap_prompt_logprobs(
            GPUModelRunner._get_prompt_logprobs_dict
        )
