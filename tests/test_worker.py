"""The worker extension (mezo_vllm/worker.py) against LoRA layers that hold bf16 slots, as a bf16
engine's do, without vLLM: the master copy stays fp32 however the slots are typed, and every
variant is written from it. (The bf16 engine itself: tests/test_oracle.py, slow.)"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mezo_vllm.adapter import LoraAdapter, LoraSpec, Update, peft_key
from mezo_vllm.worker import MezoWorkerExtension

SHAPES = {f"model.layers.{i}.self_attn.{m}": (12, 10) for i in range(2) for m in ("q_proj", "v_proj")}
SLOTS = 3


class Bf16Layer:
    """What the extension uses of a vLLM LoRA layer: stacked slot tensors in the engine's dtype,
    written by `set_lora` (a copy, cast to that dtype, as vLLM's)."""

    def __init__(self, out: int, inp: int, r: int):
        self.lora_a_stacked = (torch.zeros(SLOTS, 1, r, inp, dtype=torch.bfloat16),)
        self.lora_b_stacked = (torch.zeros(SLOTS, 1, out, r, dtype=torch.bfloat16),)

    def set_lora(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        self.lora_a_stacked[0][slot, 0, : a.shape[0], : a.shape[1]].copy_(a)
        self.lora_b_stacked[0][slot, 0, : b.shape[0], : b.shape[1]].copy_(b)

    def reset_lora(self, slot: int) -> None:
        self.lora_a_stacked[0][slot].zero_()
        self.lora_b_stacked[0][slot].zero_()


def _worker(adapter: LoraAdapter) -> MezoWorkerExtension:
    manager = SimpleNamespace(
        modules={name: Bf16Layer(out, inp, adapter.spec.r) for name, (out, inp) in SHAPES.items()},
        packed_modules={}, lora_index_to_id=[1, 2, None])
    worker = MezoWorkerExtension()
    worker.model_runner = SimpleNamespace(lora_manager=SimpleNamespace(_adapter_manager=manager))
    worker.mezo_install(adapter.spec, adapter.tensors)
    return worker


def test_the_master_stays_fp32_beside_bf16_slots():
    adapter = LoraAdapter.init(LoraSpec(r=4, alpha=8.0), SHAPES, seed=0)
    worker = _worker(adapter)
    replay = adapter.copy()
    for step in range(20):  # updates far below bf16's resolution of these weights
        update = Update(terms=((100 + step, 1e-5),))
        worker.mezo_apply_update(update)
        replay.apply(update)
    master = worker.mezo_master()
    assert {t.dtype for t in master.values()} == {torch.float32}
    assert all(torch.equal(master[k], v) for k, v in replay.tensors.items())  # every update kept
    assert any(bool((v != v.bfloat16().float()).any()) for v in master.values())  # finer than bf16

    worker.mezo_write([(1, 7, 0.01), (2, 7, -0.01)])
    plus, minus = replay.variants([(7, 0.01), (7, -0.01)])
    for adapter_id, expected in ((1, plus), (2, minus)):
        held = worker.mezo_read_slot(adapter_id)
        assert {t.dtype for t in held.values()} == {torch.bfloat16}
        for k, v in expected.items():
            want = v * adapter.spec.scaling if "lora_B" in k else v
            assert torch.equal(held[k], want.bfloat16()), k  # written from the fp32 master, then cast
    assert all(torch.equal(worker.mezo_master()[k], v) for k, v in master.items())  # writing left it alone
    assert peft_key("model.layers.0.self_attn.q_proj", "A") in master
