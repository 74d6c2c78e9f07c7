"""The vLLM engine against itself (in place vs from disk) and against transformers + PEFT."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mezo_vllm.data import Request, load_task, tokenize
from mezo_vllm.reference import ReferenceEngine

PROMPTS = [
    "The capital of France is Paris",
    "def add(a, b):\n    return a + b",
    "Once upon a time, there was a little dragon who lived in a cave by the sea. Every morning",
]


@pytest.fixture(scope="module")
def requests_(tokenizer) -> list[Request]:
    """Fixed prompts, each scored on its last tokens, plus two SST-2 examples with their options."""
    reqs = []
    for i, text in enumerate(PROMPTS):
        ids = tuple(tokenizer(text)["input_ids"])
        reqs.append(Request(i, 0, ids, max(1, len(ids) - 4)))
    sst2, _ = tokenize(load_task("sst2").dev.examples[:2], tokenizer, 1024)
    return reqs + [dataclasses.replace(r, example=r.example + 10) for r in sst2]


def test_default_model_knows_paris(engine_fp32):
    context = engine_fp32.tokenizer("The capital of France is")["input_ids"]
    assert engine_fp32.generate([context], 2, [None])[0][0].startswith(" Paris")


def test_in_place_slot_equals_adapter_loaded_from_disk(engine_fp32, random_adapter, tmp_path, requests_, model_dir):
    random_adapter.save(tmp_path / "adapter", base_model=model_dir)
    engine_fp32.load_master(random_adapter)
    engine_fp32.write_variants([(0, 0.0), (11, 1e-2)])
    in_place = engine_fp32.score(requests_, [0, 1, None])
    from_disk = engine_fp32.score_from_disk(str(tmp_path / "adapter"), requests_)
    np.testing.assert_allclose(in_place[0], from_disk, atol=1e-4)
    assert np.abs(in_place[0] - in_place[2]).max() > 1e-2  # the adapter matters
    assert np.abs(in_place[0] - in_place[1]).max() > 1e-5  # so does the perturbation


def test_vllm_scores_equal_transformers_peft(engine_fp32, random_adapter, requests_, model_dir):
    reference = ReferenceEngine(model_dir, random_adapter)
    writes = [(11, 1e-2), (11, -1e-2)]
    engine_fp32.load_master(random_adapter)
    for engine in (engine_fp32, reference):
        engine.write_variants(writes)
    ours = engine_fp32.score(requests_, [None, 0, 1])
    theirs = reference.score(requests_, [None, 0, 1])
    np.testing.assert_allclose(ours, theirs, atol=1e-3)


def test_update_and_master_round_trip(engine_fp32, initial_adapter):
    from mezo_vllm.adapter import Update

    engine_fp32.load_master(initial_adapter)
    update = Update(terms=((5, -0.1),), decay=0.01)
    engine_fp32.apply_update(update)
    expected = initial_adapter.copy()
    expected.apply(update)
    master = engine_fp32.master()
    assert all(torch.equal(master[k], v) for k, v in expected.tensors.items())
