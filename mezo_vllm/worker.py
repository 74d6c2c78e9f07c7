"""The worker side of the engine: a vLLM worker extension that holds the master adapter.

vLLM mixes `worker_extension_cls` into its worker class (`v1/worker/worker_base.py`), and
`LLM.collective_rpc("name", args=...)` calls a method by name on every worker, in this process
or in the workers vLLM spawns (tensor/pipeline parallel, `VLLM_ENABLE_V1_MULTIPROCESSING=1`): only
the name and plain arguments (seeds, scales, an `Update`, an adapter's tensors at start) travel.
Each worker keeps the fp32 master copy and regenerates z for its tensors, and vLLM's own
`set_lora` writes each variant into its LoRA slot in place (the layers take their shard).
Methods are prefixed `mezo_` so they never collide with the worker's own (vLLM asserts that).
"""

from __future__ import annotations

from typing import Any

import torch

from .adapter import LoraAdapter, LoraSpec, Update, peft_key
from .patches import span_logprobs

DISK_ADAPTER_ID = 1_000_000  # the spare slot's adapter id (score_from_disk); variant k uses id k + 1
QUALNAME = f"{__name__}.MezoWorkerExtension"


class _Slots:
    """Where the master adapter's tensors go in vLLM's LoRA layers."""

    def __init__(self, manager: Any, adapter: LoraAdapter):
        self.manager = manager
        modules = adapter.modules()
        self.layout: list[tuple[str, list[str | None]]] = []
        for name in manager.modules:
            parts = manager.packed_modules.get(name, [name])
            mine = [p if p in modules else None for p in parts]
            if any(mine):
                self.layout.append((name, mine))
        covered = {p for _, parts in self.layout for p in parts if p}
        if covered != set(modules):
            missing = sorted(set(modules) - covered)[:3]
            raise RuntimeError(f"vLLM has no LoRA layer for adapter modules {missing}")
        # `write` sets only this adapter's layers: an earlier adapter's other layers (a larger
        # target set loaded before) must not stay in the variant slots.
        mine_names = {name for name, _ in self.layout}
        for slot, adapter_id in enumerate(manager.lora_index_to_id):
            if adapter_id is not None and adapter_id != DISK_ADAPTER_ID:
                for name, layer in manager.modules.items():
                    if name not in mine_names:
                        layer.reset_lora(slot)

    def slot(self, adapter_id: int) -> int:
        return self.manager.lora_index_to_id.index(adapter_id)


class MezoWorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker (it has `model_runner`)."""

    def _mezo_manager(self) -> Any:
        return self.model_runner.lora_manager._adapter_manager  # type: ignore[attr-defined]

    def mezo_install(self, spec: LoraSpec, tensors: dict[str, torch.Tensor]) -> None:
        """Hold a copy of this adapter as the master, laid out for this worker's LoRA layers."""
        adapter = LoraAdapter(spec, {k: v.clone() for k, v in tensors.items()})
        self._mezo_slots = _Slots(self._mezo_manager(), adapter)
        self._mezo_master = adapter

    def mezo_write(self, writes: list[tuple[int, Any, float]]) -> None:
        """Slot of adapter id ← θ + scale·z(direction) for each (id, direction, scale), α/r folded
        into B as vLLM folds it when it loads an adapter from disk."""
        adapter, slots = self._mezo_master, self._mezo_slots
        variants = adapter.variants([(direction, scale) for _, direction, scale in writes])
        scaling = adapter.spec.scaling
        for (adapter_id, _, _), tensors in zip(writes, variants):
            slot = slots.slot(adapter_id)
            for name, parts in slots.layout:
                a = [None if p is None else tensors[peft_key(p, "A")] for p in parts]
                b = [None if p is None else tensors[peft_key(p, "B")] * scaling for p in parts]
                layer = slots.manager.modules[name]
                if len(parts) == 1:
                    layer.set_lora(slot, a[0], b[0])
                else:
                    layer.set_lora(slot, a, b)

    def mezo_apply_update(self, update: Update) -> None:
        self._mezo_master.apply(update)

    def mezo_master(self) -> dict[str, torch.Tensor]:
        """A copy of the master tensors, on the CPU (the driver saves them)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self._mezo_master.tensors.items()}

    def mezo_read_slot(self, adapter_id: int) -> dict[str, torch.Tensor]:
        """The slot's weights as vLLM holds them, by PEFT name (α/r folded into B), on the CPU:
        what the exact-restore test compares bitwise with a replay of the trajectory."""
        slots = self._mezo_slots
        slot = slots.slot(adapter_id)
        out: dict[str, torch.Tensor] = {}
        for name, parts in slots.layout:
            layer = slots.manager.modules[name]
            for i, part in enumerate(parts):
                if part is None:
                    continue
                for matrix, stacked in (("A", layer.lora_a_stacked), ("B", layer.lora_b_stacked)):
                    rows, cols = self._mezo_master.tensors[peft_key(part, matrix)].shape
                    out[peft_key(part, matrix)] = stacked[i][slot, 0, :rows, :cols].to("cpu", copy=True)
        return out

    def mezo_take_spans(self) -> dict[int, Any]:
        """The span log-probs this worker computed since the last call (patches.span_logprobs)."""
        return span_logprobs.take_from(self.model_runner)  # type: ignore[attr-defined]
