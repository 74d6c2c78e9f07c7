"""One request per example where the options allow it: the same losses as one request per
option, on the real engine and on transformers, for every task kind and for mixed batches."""

from __future__ import annotations

import numpy as np
import pytest

from mezo_vllm.data import CLASSIFICATION, Dataset, builtin_tasks, load_task, tokenize
from mezo_vllm.objective import example_losses
from mezo_vllm.reference import ReferenceEngine

VARIANTS = [None, 0, 1]
TOL = 1e-5  # fp32, |Δ loss| between the merged and the one-request-per-option path
REFERENCE_TOL = 1e-4  # vLLM vs transformers in fp32 (validate's LOSS_TOL): kernels differ


def _assert_same_losses(engine, reference, dataset, merged, separate) -> np.ndarray:
    """Merged == separate on vLLM within TOL, and merged no farther from transformers than
    the separate path is (plus TOL)."""
    ours, theirs = _losses(engine, dataset, merged), _losses(engine, dataset, separate)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)
    truth = _losses(reference, dataset, merged)
    np.testing.assert_allclose(ours, truth, rtol=0, atol=REFERENCE_TOL)
    assert np.abs(ours - truth).max() <= np.abs(theirs - truth).max() + TOL
    return ours


def _losses(engine, dataset: Dataset, requests) -> np.ndarray:
    return example_losses(dataset.examples, dataset.kind, requests, engine.score(requests, VARIANTS)).numpy()


@pytest.fixture(scope="module")
def reference(model_dir, random_adapter_module) -> ReferenceEngine:
    return ReferenceEngine(model_dir, random_adapter_module)


@pytest.fixture(scope="module")
def random_adapter_module(initial_adapter):
    import torch

    g = torch.Generator().manual_seed(321)
    from mezo_vllm.adapter import LoraAdapter

    tensors = {k: (torch.randn(v.shape, generator=g) * 0.05 if "lora_B" in k else v.clone())
               for k, v in initial_adapter.tensors.items()}
    return LoraAdapter(initial_adapter.spec, tensors)


@pytest.fixture
def both(engine_fp32, reference, random_adapter_module):
    for engine in (engine_fp32, reference):
        engine.load_master(random_adapter_module)
        engine.write_variants([(5, 1e-2), (5, -1e-2)])
    return engine_fp32, reference


@pytest.mark.parametrize("task", builtin_tasks())
def test_each_task_kind_keeps_its_losses(both, tokenizer, task):
    engine, reference = both
    n = 2 if task in ("drop", "squad", "boolq") else 4  # passages of hundreds of tokens: 2 do
    dataset = Dataset(task, load_task(task).train.kind, load_task(task).train.examples[:n])
    merged, _ = tokenize(dataset.examples, tokenizer, 1024)
    separate, _ = tokenize(dataset.examples, tokenizer, 1024, merge_options=False)
    if task in ("sst2", "sst2-mezo", "rte", "cb", "boolq"):  # single-token verbalizers: one request per example
        assert len(merged) == len(dataset.examples) < len(separate)
    ours = _assert_same_losses(engine, reference, dataset, merged, separate)
    assert np.abs(ours[1] - ours[2]).max() > 1e-5  # the ± variants score differently


def test_a_mixed_batch_keeps_its_losses(both, tokenizer):
    """Merged (SST-2, CB: three options) and one-per-option (COPA) requests in one call."""
    engine, reference = both
    examples = (*load_task("sst2").dev.examples[:3], *load_task("cb").dev.examples[:2],
                *load_task("copa").dev.examples[:3])
    dataset = Dataset("mixed", CLASSIFICATION, examples)
    merged, _ = tokenize(examples, tokenizer, 1024)
    separate, _ = tokenize(examples, tokenizer, 1024, merge_options=False)
    assert len(merged) == 3 + 2 + 6 and len(separate) == 6 + 6 + 6
    _assert_same_losses(engine, reference, dataset, merged, separate)


def test_stock_scoring_splits_a_merged_request_into_its_columns(engine_fp32, tokenizer):
    """Upstream's prompt log-probs cover only the prompt's own tokens: each column of a merged
    request is scored as its own request there, and the sums agree with the span path."""
    examples = load_task("sst2").dev.examples[:4]
    merged, _ = tokenize(examples, tokenizer, 1024)
    engine_fp32.write_variants([(5, 1e-2), (5, -1e-2)])
    loras = engine_fp32._variant_loras(VARIANTS)
    np.testing.assert_allclose(engine_fp32.score(merged, VARIANTS),
                               engine_fp32._score_prompt_logprobs(merged, loras), rtol=0, atol=1e-4)
