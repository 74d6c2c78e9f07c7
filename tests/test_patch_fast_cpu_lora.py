"""mezo_vllm/patches/fast_cpu_lora: per-segment LoRA matmuls equal upstream's per-token ops; no engine."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops.torch_ops import sgmv_expand, sgmv_expand_slice, sgmv_shrink
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from mezo_vllm.patches import fast_cpu_lora

SLOTS, RANK, IN, OUT, OFFSET = 4, 8, 48, 40, 24
# Several slots, slot 0 in two segments that are not adjacent, and segments of length 1.
MIXED = [0] * 5 + [2] * 7 + [1] * 3 + [0] * 4 + [3] + [2]
# A segment without an adapter (-1) between two with one.
WITH_NONE = [1] * 4 + [-1] * 5 + [0] * 6
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(scope="module", autouse=True)
def patched():
    fast_cpu_lora.apply()


def wrapper(token_slots: list[int], prefill: bool) -> PunicaWrapperCPU:
    """A CPU punica wrapper with the metadata vLLM would set for these per-token slots."""
    w = PunicaWrapperCPU(64, 16, "cpu")
    t = torch.tensor(token_slots)
    w._token_lora_indices[: len(t)].copy_(t)
    w.indices_len[0] = len(t)
    w._update_prefill_metadata(t)
    w.is_prefill = prefill
    return w


def tensors(n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g).to(dtype)
    a = (torch.randn(SLOTS, 1, RANK, IN, generator=g) / IN**0.5).to(dtype)
    h = torch.randn(n, RANK, generator=g)  # the fp32 shrink buffer expand reads
    b = (torch.randn(SLOTS, 1, OUT, RANK, generator=g) / RANK**0.5).to(dtype)
    y = torch.randn(n, OFFSET + OUT + 8, generator=g).to(dtype)  # expand target, wider than B
    return x, a, h, b, y


def by_hand(token_slots, op, x, w, y, scale=1.0, offset=0, add_inputs=True):
    """Row by row, in y's dtype; rows without an adapter keep their value."""
    y = y.clone()
    for t, slot in enumerate(token_slots):
        if slot < 0:
            continue
        out = x[t].to(y.dtype) @ w[slot, 0].to(y.dtype).T
        if op == "shrink":
            y[t, : out.shape[0]] = scale * out
        else:
            cols = slice(offset, offset + out.shape[0])
            y[t, cols] = y[t, cols] + out if add_inputs else out
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefill", [True, False])
def test_shrink_equals_upstream(dtype, prefill):
    w = wrapper(MIXED, prefill)
    x, a, _, _, _ = tensors(len(MIXED), dtype)
    expected = torch.zeros(len(MIXED), RANK + 3)  # upstream overwrites [:, :r], leaves the rest
    expected[:, RANK:] = 7.0
    got = expected.clone()
    sgmv_shrink(x, a, expected, *w.prefill_metadata, 0.5)
    w.add_shrink((got,), x, (a,), 0.5)
    torch.testing.assert_close(got, expected, **TOL[dtype])
    assert (got[:, RANK:] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefill", [True, False])
@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_equals_upstream(dtype, prefill, add_inputs):
    w = wrapper(MIXED, prefill)
    _, _, h, b, y = tensors(len(MIXED), dtype)
    expected, got = y.clone(), y.clone()
    sgmv_expand(h, b, expected, *w.prefill_metadata, add_inputs)
    (w._expand_prefill if prefill else w._expand_decode)(got, h, b, add_inputs)
    torch.testing.assert_close(got, expected, **TOL[dtype])
    assert torch.equal(got[:, OUT:], y[:, OUT:])  # columns past B's output are left alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefill", [True, False])
@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_slice_equals_upstream(dtype, prefill, add_inputs):
    w = wrapper(MIXED, prefill)
    _, _, h, b, y = tensors(len(MIXED), dtype)
    expected, got = y.clone(), y.clone()
    sgmv_expand_slice(h, b, expected, *w.prefill_metadata, OFFSET, OUT, add_inputs)
    w._apply_expand(got, h, b, OFFSET, OUT, add_inputs)
    torch.testing.assert_close(got, expected, **TOL[dtype])
    assert torch.equal(got[:, :OFFSET], y[:, :OFFSET])
    assert torch.equal(got[:, OFFSET + OUT :], y[:, OFFSET + OUT :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_lora_linear_equals_upstream(dtype):
    """A packed layer (three slices, like qkv_proj) through the wrapper, as the model calls it."""
    w = wrapper(MIXED, True)
    n, slices = len(MIXED), (16, 8, 8)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, IN, generator=g).to(dtype)
    a = tuple((torch.randn(SLOTS, 1, RANK, IN, generator=g) / IN**0.5).to(dtype) for _ in slices)
    b = tuple((torch.randn(SLOTS, 1, s, RANK, generator=g) / RANK**0.5).to(dtype) for s in slices)
    y = torch.randn(n, sum(slices), generator=g).to(dtype)
    expected, got = y.clone(), y.clone()
    offset = 0
    for ai, bi, size in zip(a, b, slices):
        buffer = torch.zeros(n, RANK)
        sgmv_shrink(x, ai, buffer, *w.prefill_metadata, 1.0)
        sgmv_expand_slice(buffer, bi, expected, *w.prefill_metadata, offset, size, True)
        offset += size
    w.add_lora_linear(got, x, a, b, 1.0, slices)
    torch.testing.assert_close(got, expected, **TOL[dtype])


def test_slices_with_zero_b_are_skipped_and_rescanned_when_written():
    """q/v adapters leave k, o, gate/up, down zero in every slot: the wrapper skips them (no
    matmul), equals upstream, and notices a slot written in place later (vLLM's set_lora)."""
    w = wrapper(MIXED, True)
    n, slices = len(MIXED), (16, 8, 8)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, IN, generator=g)
    a = tuple(torch.randn(SLOTS, 1, RANK, IN, generator=g) / IN**0.5 for _ in slices)
    b = tuple(torch.randn(SLOTS, 1, s, RANK, generator=g) / RANK**0.5 for s in slices)
    b[1].zero_()  # the middle slice: zero in every slot
    b[0][2].zero_()  # the first slice: zero in slot 2 only

    def upstream(y):
        offset = 0
        for ai, bi, size in zip(a, b, slices):
            buffer = torch.zeros(n, RANK)
            sgmv_shrink(x, ai, buffer, *w.prefill_metadata, 1.0)
            sgmv_expand_slice(buffer, bi, y, *w.prefill_metadata, offset, size, True)
            offset += size
        return y

    calls = []
    real = fast_cpu_lora.shrink
    fast_cpu_lora.shrink = lambda *args: (calls.append(1), real(*args))
    try:
        y = torch.randn(n, sum(slices), generator=g)
        got = y.clone()
        w.add_lora_linear(got, x, a, b, 1.0, slices)
        torch.testing.assert_close(got, upstream(y.clone()))
        segs = fast_cpu_lora.token_segments(torch.tensor(MIXED))
        in_slot_2 = sum(1 for _, _, slot in segs if slot == 2)
        assert len(calls) == 2 * len(segs) - in_slot_2  # slice 1 never, slice 0 not in slot 2
        b[1][0, 0].copy_(torch.randn(8, RANK, generator=g))  # write slot 0 of the middle slice
        got = y.clone()
        w.add_lora_linear(got, x, a, b, 1.0, slices)
        torch.testing.assert_close(got, upstream(y.clone()))
        assert not torch.equal(got[:, 16:24], y[:, 16:24])
    finally:
        fast_cpu_lora.shrink = real


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefill", [True, False])
def test_rows_without_adapter_are_left_alone(dtype, prefill):
    """Upstream reads the last slot for -1; the patch skips those rows (reference by hand)."""
    w = wrapper(WITH_NONE, prefill)
    n = len(WITH_NONE)
    x, a, h, b, y = tensors(n, dtype)
    buffer = torch.full((n, RANK), 3.0)
    got = buffer.clone()
    w._apply_shrink(got, x, a, 0.5)
    expected = by_hand(WITH_NONE, "shrink", x, a, buffer, scale=0.5)
    torch.testing.assert_close(got, expected, **TOL[dtype])
    for add_inputs in (True, False):
        got = y.clone()
        w.add_lora_embedding(got, h, b, add_inputs=add_inputs)  # expand
        expected = by_hand(WITH_NONE, "expand", h, b, y, add_inputs=add_inputs)
        torch.testing.assert_close(got, expected, **TOL[dtype])
        got = y.clone()
        w._apply_expand(got, h, b, OFFSET, OUT, add_inputs)
        expected = by_hand(WITH_NONE, "expand", h, b, y, offset=OFFSET, add_inputs=add_inputs)
        torch.testing.assert_close(got, expected, **TOL[dtype])
    assert torch.equal(got[4:9], y[4:9])


def test_no_adapter_at_all_changes_nothing():
    w = wrapper([-1] * 6, True)
    assert w.no_lora
    x, a, h, b, y = tensors(6, torch.float32)
    got = y.clone()
    w.add_lora_linear(got, x, (a,), (b,), 1.0, (OUT,))
    assert torch.equal(got, y)


def test_segments_from_token_slots():
    assert fast_cpu_lora.token_segments(torch.tensor(WITH_NONE)) == [(0, 4, 1), (9, 6, 0)]
    w = wrapper(MIXED, True)
    assert fast_cpu_lora.segments(*w.prefill_metadata[:3]) == fast_cpu_lora.token_segments(
        torch.tensor(MIXED)
    ) == [(0, 5, 0), (5, 7, 2), (12, 3, 1), (15, 4, 0), (19, 1, 3), (20, 1, 2)]


def test_apply_is_idempotent():
    ops, modes = ("shrink", "expand", "expand_slice"), ("prefill", "decode")
    names = [f"_{op}_{mode}" for op in ops for mode in modes]
    fast_cpu_lora.apply()
    first = {name: PunicaWrapperCPU.__dict__[name] for name in names}
    fast_cpu_lora.apply()
    assert {name: PunicaWrapperCPU.__dict__[name] for name in names} == first
    assert all(method.__module__ == fast_cpu_lora.__name__ for method in first.values())
    assert getattr(PunicaWrapperCPU, f"_mezo_vllm_patch_{fast_cpu_lora.NAME}") is True
