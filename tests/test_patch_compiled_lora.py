"""mezo_vllm/patches/compiled_lora: the LoRA ops as opaque custom ops (the same arithmetic as
fast_cpu_lora, under torch.compile too), and vLLM's compilation kept on with LoRA only when asked."""

from __future__ import annotations

import pytest
import torch
from vllm.config import CompilationMode
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from mezo_vllm.patches import compiled_lora, fast_cpu_lora

SLOTS, RANK, IN = 3, 4, 24
SLICES = (16, 8, 8)
TOKEN_SLOTS = [0] * 5 + [2] * 4 + [-1] * 3 + [1] * 6


@pytest.fixture(scope="module", autouse=True)
def patched():
    compiled_lora.apply()


def _layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(SLOTS, 1, RANK, IN, generator=g) / IN**0.5 for _ in SLICES]
    b = [torch.randn(SLOTS, 1, s, RANK, generator=g) / RANK**0.5 for s in SLICES]
    b[1].zero_()
    return a, b


def _wrapper(token_slots: list[int]) -> PunicaWrapperCPU:
    w = PunicaWrapperCPU(64, 16, "cpu")
    w._token_lora_indices[: len(token_slots)].copy_(torch.tensor(token_slots))
    w.indices_len[0] = len(token_slots)
    w._update_prefill_metadata(torch.tensor(token_slots))
    w.is_prefill = True
    return w


def test_the_wrapper_calls_one_opaque_op_with_fast_cpu_lora_arithmetic():
    a, b = _layer()
    n = len(TOKEN_SLOTS)
    x = torch.randn(n, IN)
    y = torch.randn(n, sum(SLICES))
    got, expected = y.clone(), y.clone()
    _wrapper(TOKEN_SLOTS).add_lora_linear(got, x, tuple(a), tuple(b), 0.5, SLICES)
    fast_cpu_lora.add_lora_linear(expected, x, tuple(a), tuple(b), 0.5, SLICES,
                                  fast_cpu_lora.token_segments(torch.tensor(TOKEN_SLOTS)))
    assert torch.equal(got, expected)
    assert torch.equal(got[9:12], y[9:12])  # tokens without an adapter
    assert not torch.equal(got[:9], y[:9])


def test_a_compiled_graph_serves_every_batch_it_did_not_see():
    """One trace (as DYNAMO_TRACE_ONCE), then other token counts and slot mappings, written into
    the wrapper's buffer in place as vLLM does before each step: results follow the buffer."""
    a, b = _layer(1)
    w = _wrapper(TOKEN_SLOTS)

    def layer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y * 1.0
        w.add_lora_linear(y, x, tuple(a), tuple(b), 1.0, SLICES)
        return torch.nn.functional.silu(y)

    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    for slots in (TOKEN_SLOTS, [1] * 7 + [0] * 2, [-1] * 4 + [2] * 9 + [0]):
        w._token_lora_indices[: len(slots)].copy_(torch.tensor(slots))
        x, y = torch.randn(len(slots), IN), torch.randn(len(slots), sum(SLICES))
        expected = y.clone()
        fast_cpu_lora.add_lora_linear(expected, x, tuple(a), tuple(b), 1.0, SLICES,
                                      fast_cpu_lora.token_segments(torch.tensor(slots)))
        torch.testing.assert_close(compiled(x, y), torch.nn.functional.silu(expected))


def test_embedding_op_skips_zero_slots_and_adds_the_rest():
    g = torch.Generator().manual_seed(2)
    b = torch.randn(SLOTS, 1, 12, RANK, generator=g)
    b[2].zero_()
    w = _wrapper(TOKEN_SLOTS)
    x, y = torch.randn(len(TOKEN_SLOTS), RANK), torch.randn(len(TOKEN_SLOTS), 12)
    got = y.clone()
    w.add_lora_embedding(got, x, b, add_inputs=True)
    expected = y.clone()
    for t, slot in enumerate(TOKEN_SLOTS):
        if slot >= 0:
            expected[t] += x[t] @ b[slot, 0].T
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("asked, mode", [("1", CompilationMode.DYNAMO_TRACE_ONCE), ("0", CompilationMode.NONE)])
def test_compilation_stays_on_with_lora_only_when_asked(model_dir, monkeypatch, asked, mode):
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setenv(compiled_lora.ENV, asked)
    config = EngineArgs(model=model_dir, enable_lora=True, max_lora_rank=8, dtype="float32").create_engine_config()
    assert config.lora_config is not None
    assert config.compilation_config.mode == mode


def test_apply_is_idempotent():
    method = PunicaWrapperCPU.add_lora_linear
    compiled_lora.apply()
    assert PunicaWrapperCPU.add_lora_linear is method and method.__module__ == compiled_lora.__name__
