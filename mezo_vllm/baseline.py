"""The strongest MeZO loop a competent transformers + PEFT user would write: the benchmark's
baseline (`mezo-vllm bench`), not the oracle (`reference.py` scores request by request).

Per step: perturb the PEFT LoRA parameters in place by +εz, one padded forward pass of the
whole batch, perturb by −2εz, a second forward pass, restore, update θ ← θ − lr·g·z. Each
forward pass is batched (left padding, so every sequence ends at the last position), feeds each
request without its last token (whose logits predict nothing scored), and computes the lm_head
on the target rows only (`logits_to_keep`); options that differ in their last token come from one
sequence (SST-2's " negative"/" positive" from the prompt's last position). The loss is the
trainer's (`objective.batch_loss`), on the same batches.

It starts from the engine's initial adapter and draws the engine's z (`adapter.noise`, by seed
and tensor name), which costs what `torch.randn` costs: so the two loops take the same steps, and
the benchmark's first-step loss gap between them is a check of the engine, not noise of two RNGs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .adapter import LoraAdapter, noise
from .data import Dataset, Request
from .objective import batch_loss


class PeftMezoLoop:
    """One transformers model with a PEFT LoRA adapter, trained by MeZO in place."""

    def __init__(self, model_dir: str, dtype: str, initial: LoraAdapter, max_batch: int = 64):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        spec = initial.spec
        config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets), lora_dropout=0.0)
        self.model = get_peft_model(base, config).eval()
        # PEFT names a parameter `...lora_A.default.weight`; the adapter file drops `.default`
        self.params = {n.replace(".default", ""): p for n, p in self.model.named_parameters() if "lora_" in n}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(initial.tensors[name])
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.max_batch = max_batch

    @torch.no_grad()
    def column_sums(self, requests: Sequence[Request]) -> torch.Tensor:
        """Summed target log-probs of every column, as `engine.score` returns them."""
        out = []
        for s in range(0, len(requests), self.max_batch):
            chunk = requests[s : s + self.max_batch]
            width = max(len(r.token_ids) - 1 for r in chunk)
            keep = max(r.n_targets for r in chunk)
            ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, r in enumerate(chunk):
                n = len(r.token_ids) - 1
                ids[i, width - n:] = torch.tensor(r.token_ids[:-1])
                mask[i, width - n:] = 1
            logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for i, r in enumerate(chunk):
                rows = logprobs[i, keep - r.n_targets:]
                out.append(rows.gather(-1, torch.tensor(r.candidates)).sum(0))
        return torch.cat(out).double()

    def _perturb(self, seed: int, scale: float) -> None:
        for name, p in self.params.items():
            p.add_(noise(seed, name, p.shape).to(p.dtype), alpha=scale)

    @torch.no_grad()
    def step(self, dataset: Dataset, requests: Sequence[Request], seed: int, eps: float, lr: float
             ) -> tuple[float, float]:
        """One MeZO step on the batch's requests; returns (L+, L−)."""
        losses = []
        for scale in (eps, -2 * eps):
            self._perturb(seed, scale)
            losses.append(float(batch_loss(dataset.examples, dataset.kind, requests, self.column_sums(requests))))
        self._perturb(seed, eps)
        g = (losses[0] - losses[1]) / (2 * eps)
        self._perturb(seed, -lr * g)
        return losses[0], losses[1]
