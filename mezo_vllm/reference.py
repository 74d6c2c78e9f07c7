"""The same scoring with transformers + PEFT: the tests' oracle and the benchmark's baseline.

It implements the engine interface the trainer uses (`write_variants`, `score`, `apply_update`,
`master`, `load_master`) with the loop a user would otherwise write: one PEFT adapter whose
weights are set to each variant in turn, padded batches, log-softmax, gather.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .adapter import LoraAdapter, Update
from .data import Request


class InProcessMaster:
    """The engine interface's master-copy half, for engines whose weights live in this process."""

    def load_master(self, adapter: LoraAdapter) -> None:
        self.adapter = adapter.copy()
        self.variants: list[dict[str, torch.Tensor]] = []

    def master(self) -> dict[str, torch.Tensor]:
        return self.adapter.copy().tensors

    def apply_update(self, update: Update) -> None:
        self.adapter.apply(update)

    def write_variants(self, writes: Sequence[tuple[int, float]]) -> None:
        self.variants = self.adapter.variants(writes)


class ReferenceEngine(InProcessMaster):
    def __init__(self, model_dir: str, adapter: LoraAdapter, dtype: str = "float32",
                 max_model_len: int = 1024, batch_size: int = 16):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_model_len = max_model_len
        self.batch_size = batch_size
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        config = LoraConfig(r=adapter.spec.r, lora_alpha=adapter.spec.alpha,
                            target_modules=list(adapter.spec.targets), lora_dropout=0.0)
        self.model = get_peft_model(base, config).eval()
        self._params = {n: p for n, p in self.model.named_parameters() if "lora_" in n}
        self.load_master(adapter)

    def _set_weights(self, tensors: dict[str, torch.Tensor] | None) -> None:
        """PEFT names its parameters `...lora_A.default.weight`; the file drops `.default`."""
        with torch.no_grad():
            for name, param in self._params.items():
                if tensors is None:
                    param.zero_()
                else:
                    param.copy_(tensors[name.replace(".default", "")])

    @torch.no_grad()
    def _score(self, requests: Sequence[Request]) -> np.ndarray:
        sums = np.empty(len(requests))
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            width = max(len(r.token_ids) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, r in enumerate(chunk):
                ids[i, : len(r.token_ids)] = torch.tensor(r.token_ids)
                mask[i, : len(r.token_ids)] = 1
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = logprobs.gather(-1, ids[:, 1:, None])[..., 0]
            for i, r in enumerate(chunk):
                sums[start + i] = picked[i, r.span_start - 1 : len(r.token_ids) - 1].sum().item()
        return sums

    def score(self, requests: Sequence[Request], variants: Sequence[int | None]) -> np.ndarray:
        rows = []
        for v in variants:
            self._set_weights(None if v is None else self.variants[v])
            rows.append(self._score(requests))
        return np.stack(rows)
