"""The same scoring with transformers + PEFT: the tests' oracle and the benchmark's baseline.

It implements the engine interface the trainer uses (`write_variants`, `score`, `apply_update`,
`master`, `load_master`) with the loop a user would otherwise write: one PEFT adapter whose
weights are set to each variant in turn, padded batches, log-softmax, gather. The variants are
the master's `LoraAdapter.variants`, i.e. the same seeded z (same generator, same tensor names)
the vLLM workers write, so `--engine reference` replays a vLLM run step for step.

As the oracle it also gives what vLLM cannot: the exact gradient of the batch loss (autograd),
hence the exact directional derivative ∇L·z that g = (L+ − L−)/2ε estimates, and an emulation of
reusing one variant's prompt KV for another (what the SGLang MeZO integration did).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .adapter import LoraAdapter, Update, noise
from .data import Example, Request
from .objective import example_losses


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


def directional_derivative(gradient: dict[str, torch.Tensor], seed: int) -> float:
    """∇L·z(seed), with z regenerated exactly as the engines perturb (per tensor name)."""
    return float(sum(
        torch.dot(g.flatten().double(), noise(seed, name, g.shape).flatten().double())
        for name, g in gradient.items()
    ))


def _pick(logprobs: torch.Tensor, request: Request) -> torch.Tensor:
    """[n_targets, columns]: the log-probs of the request's candidates, from its span rows'
    full-vocabulary log-probs."""
    candidates = torch.tensor(request.candidates)
    return logprobs.gather(-1, candidates)


class ReferenceEngine(InProcessMaster):
    def __init__(self, model_dir: str, adapter: LoraAdapter, dtype: str = "float32",
                 max_model_len: int = 1024, batch_size: int = 16, trust_remote_code: bool = False):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.max_model_len = max_model_len
        self.batch_size = batch_size
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                    trust_remote_code=trust_remote_code)
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

    def _weights_of(self, variant: int | None) -> dict[str, torch.Tensor] | None:
        return None if variant is None else self.variants[variant]

    @torch.no_grad()
    def _token_logprobs(self, requests: Sequence[Request]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            width = max(len(r.token_ids) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, r in enumerate(chunk):
                ids[i, : len(r.token_ids)] = torch.tensor(r.token_ids)
                mask[i, : len(r.token_ids)] = 1
            # the body once, the lm_head on the span rows only (the full [batch, length, vocab]
            # logits of a 400-token batch are 1.3 GB)
            model = self.model.get_base_model()
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            for i, r in enumerate(chunk):
                logits = model.get_output_embeddings()(hidden[i, r.span_start - 1 : len(r.token_ids) - 1])
                out.append(_pick(torch.log_softmax(logits.float(), dim=-1), r).double().numpy())
        return out

    def token_logprobs(self, requests: Sequence[Request], variants: Sequence[int | None]
                       ) -> list[list[np.ndarray]]:
        """log p of each target token, [variant][request] arrays [n_targets, columns], as
        `VllmEngine.token_logprobs`."""
        rows = []
        for v in variants:
            self._set_weights(self._weights_of(v))
            rows.append(self._token_logprobs(requests))
        return rows

    @torch.no_grad()
    def generate(self, contexts: Sequence[Sequence[int]], max_tokens: int,
                 variants: Sequence[int | None], stop: str = "\n") -> list[list[str]]:
        """Greedy continuations [variant][context], cut before `stop`, as `VllmEngine.generate`."""
        out = []
        for v in variants:
            self._set_weights(self._weights_of(v))
            texts = []
            for context in contexts:
                ids = torch.tensor([list(context)])
                new = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=max_tokens, pad_token_id=self.tokenizer.eos_token_id)
                text = self.tokenizer.decode(new[0, ids.shape[1]:], skip_special_tokens=True)
                texts.append(text.split(stop)[0])
            out.append(texts)
        return out

    def score(self, requests: Sequence[Request], variants: Sequence[int | None]) -> np.ndarray:
        """[variants, columns] summed target log-probs, as `VllmEngine.score`."""
        return np.array([np.concatenate([t.sum(0) for t in row])
                         for row in self.token_logprobs(requests, variants)])

    def _span_logprobs(self, request: Request, past: Any = None, start: int = 0) -> torch.Tensor:
        """log p of the request's target tokens from one forward pass over token_ids[start:],
        after `past` (the KV of token_ids[:start]); only the span's logits are computed."""
        ids = torch.tensor([request.token_ids[start:]])
        keep = len(request.token_ids) - request.span_start + 1  # rows span_start-1 .. len-1
        out = self.model(input_ids=ids, past_key_values=past, use_cache=past is not None,
                         logits_to_keep=keep)
        logprobs = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
        return _pick(logprobs, request).double()

    def gradient(self, examples: Sequence[Example], kind: str, requests: Sequence[Request]
                 ) -> tuple[float, dict[str, torch.Tensor]]:
        """The trainer's batch loss at the master θ and its exact gradient, by master tensor name.

        One example at a time (its loss depends on its own requests only), so memory is that of
        one example's backward pass, whatever the batch.
        """
        self._set_weights(self.adapter.tensors)
        for p in self._params.values():
            p.grad = None
        by_example: dict[int, list[Request]] = {}
        for r in requests:
            by_example.setdefault(r.example, []).append(r)
        total = 0.0
        for reqs in by_example.values():
            sums = torch.cat([self._span_logprobs(r).sum(0) for r in reqs])
            loss = example_losses(examples, kind, reqs, sums)[0] / len(by_example)
            loss.backward()
            total += loss.item()
        grads = {name.replace(".default", ""): p.grad.detach().clone()
                 for name, p in self._params.items()}
        for p in self._params.values():
            p.grad = None
        return total, grads

    @torch.no_grad()
    def score_reusing_prompt_kv(self, requests: Sequence[Request], donor: int, variant: int
                                ) -> np.ndarray:
        """Summed target log-probs of each column under `variant`, with the prompt's KV taken
        from `donor`.

        An emulation, for measurement only, of a prefix cache that ignores which adapter
        computed a prefix (the SGLang MeZO integration's reuse of the +εz pass's prompt KV for
        the −εz pass): token_ids[:span_start-1] run under `donor`, the rest, from the first row
        that predicts a target token, under `variant`. Token-granular, as a radix cache is.
        """
        out = []
        for r in requests:
            cut = r.span_start - 1
            past = None
            if cut > 0:
                self._set_weights(self._weights_of(donor))
                past = self.model(input_ids=torch.tensor([r.token_ids[:cut]]), use_cache=True).past_key_values
            self._set_weights(self._weights_of(variant))
            out.append(self._span_logprobs(r, past=past, start=cut).sum(0).numpy())
        return np.concatenate(out)

    @torch.no_grad()
    def score_one_by_one(self, requests: Sequence[Request], variant: int | None) -> np.ndarray:
        """`score` without batching or padding: the exact counterpart of `score_reusing_prompt_kv`."""
        self._set_weights(self._weights_of(variant))
        return np.concatenate([self._span_logprobs(r).sum(0).numpy() for r in requests])
