"""Adapters a user brings or asks for: an existing PEFT adapter as the start (--init-adapter),
a rank vLLM does not list (its slots are sized by the next one up), and adapter files a server
run by another user can read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from mezo_vllm import rundir
from mezo_vllm.adapter import LoraSpec, init_from, model_linear_shapes
from mezo_vllm.data import Request

TEXTS = ["a gorgeous, witty, seductive movie. It was great", "The weather today is cold and wet"]


def _peft_scores(model_dir: str, adapter_dir: Path, requests: list[Request]) -> np.ndarray:
    """Summed span log-probs of transformers + PEFT with the adapter as PEFT loads it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter_dir))
    sums = []
    for r in requests:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([r.token_ids])).logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(r.token_ids[1:])[:, None])[:, 0]
        sums.append(lp[r.span_start - 1:].sum().item())
    return np.array(sums)


@pytest.mark.slow
def test_a_peft_adapter_of_rank_4_starts_a_run_and_scores_as_peft(tmp_path, engine_fp32, model_dir, tokenizer,
                                                                  random_adapter):
    """The shared engine's slots are rank 8 (max_lora_rank), first filled by a rank-8 adapter; a
    rank-4 adapter made by PEFT (random A and B), taken by --init-adapter's loader, fills their
    first 4 rows and scores as PEFT does, and as vLLM does loading the folder itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    engine_fp32.load_master(random_adapter)
    engine_fp32.write_variants([(0, 0.0), (1, 0.0)])  # every row of both slots non-zero
    torch.manual_seed(0)
    made = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                          LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    made.save_pretrained(tmp_path / "peft")
    adapter = init_from(tmp_path / "peft", LoraSpec(r=4, alpha=12.0), model_linear_shapes(model_dir))
    requests = [Request(i, 0, tuple(tokenizer(t)["input_ids"]), 2) for i, t in enumerate(TEXTS)]

    engine_fp32.load_master(adapter)
    engine_fp32.write_variants([(0, 0.0)])
    ours = engine_fp32.score(requests, [0])[0]
    slot = engine_fp32.slot_tensors(0)
    assert all(torch.equal(slot[k], v * (3.0 if "lora_B" in k else 1.0)) for k, v in adapter.tensors.items())
    peft = _peft_scores(model_dir, tmp_path / "peft", requests)
    np.testing.assert_allclose(ours, peft, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(engine_fp32.score_from_disk(str(tmp_path / "peft"), requests), peft, rtol=1e-5, atol=1e-4)
    base = engine_fp32.score(requests, [None])[0]
    assert np.abs(base - peft).max() > 1e-2  # the adapter changes the scores


def test_adapter_files_are_world_readable_whatever_the_umask(tmp_path, initial_adapter):
    old = os.umask(0o077)
    try:
        initial_adapter.save(tmp_path / "plain", base_model="m")
        rundir.write_whole(tmp_path / "published", lambda f: initial_adapter.save(f / "adapter", base_model="m"))
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in sorted(tmp_path.rglob("*"))}
    assert modes == {
        "plain": 0o700,  # a folder the caller made (umask 077), not published
        "plain/adapter_config.json": 0o644, "plain/adapter_model.safetensors": 0o644,
        "published": 0o755, "published/adapter": 0o755,
        "published/adapter/adapter_config.json": 0o644, "published/adapter/adapter_model.safetensors": 0o644}
