"""End-to-end MeZO runs on SST-2 with the shared engine (slow: deselect with -m 'not slow')."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mezo_vllm.config import TuneConfig
from mezo_vllm.trainer import tune

pytestmark = pytest.mark.slow

STEPS = 20


def _run(tmp_path, name, engine, steps=STEPS, **overrides):
    """A constant lr, so that a shorter run's steps are the first steps of a longer one; MeZO's
    template (`sst2-mezo`), where the untrained model is at chance, so the loss has room to fall
    within 20 steps (task `sst2`'s template starts at ~80% accuracy)."""
    cfg = TuneConfig(out=str(tmp_path / name), task="sst2-mezo", steps=steps, directions=1, lr=5e-3, eps=1e-2, lr_schedule="constant",
                     eval_every=0, save_every=10, eval_examples=20, **overrides)
    tune(cfg, engine=engine)
    return tmp_path / name


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, engine_fp32):
    return _run(tmp_path_factory.mktemp("tune"), "a", engine_fp32)


def _trajectory(run):
    return [json.loads(line) for line in (run / "trajectory.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss(run_dir):
    losses = [(r["loss_plus"] + r["loss_minus"]) / 2 for r in _trajectory(run_dir)]
    assert len(losses) == STEPS
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_same_seed_same_trajectory(run_dir, tmp_path, engine_fp32):
    again = _run(tmp_path, "b", engine_fp32, steps=8)
    first = (run_dir / "trajectory.jsonl").read_text().splitlines()[:8]
    assert (again / "trajectory.jsonl").read_text().splitlines() == first


def test_run_folder(run_dir):
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.json",
                 "metrics.jsonl", "curves.png", "checkpoint/state.json"):
        assert (run_dir / name).is_file(), name
    record = _trajectory(run_dir)[0]
    assert set(record) == {"step", "seed", "g", "loss_plus", "loss_minus", "lr"}
    assert record["g"] == pytest.approx((record["loss_plus"] - record["loss_minus"]) / 2e-2)


def test_tuned_adapter_loads_in_peft_and_vllm_alike(run_dir, engine_fp32, tokenizer, model_dir):
    """The adapter `tune` wrote, read by vLLM (LoRARequest) and by PEFT on transformers."""
    from mezo_vllm.adapter import LoraAdapter
    from mezo_vllm.data import Request
    from mezo_vllm.reference import ReferenceEngine

    texts = ["a gorgeous, witty, seductive movie. It was great", "The weather today is cold and wet"]
    requests = [Request(i, 0, tuple(tokenizer(t)["input_ids"]), 2) for i, t in enumerate(texts)]
    adapter = LoraAdapter.load(run_dir / "adapter")
    assert any(v.abs().max() > 0 for k, v in adapter.tensors.items() if "lora_B" in k)
    vllm_scores = engine_fp32.score_from_disk(str(run_dir / "adapter"), requests)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    import torch

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(run_dir / "adapter"))
    for r, score in zip(requests, vllm_scores):
        with torch.no_grad():
            logits = peft_model(input_ids=torch.tensor([r.token_ids])).logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(r.token_ids[1:])[:, None])[:, 0]
        assert abs(lp[r.span_start - 1 :].sum().item() - score) < 1e-3
    base = ReferenceEngine(model_dir, adapter).score(requests, [None])[0]
    assert np.abs(base - vllm_scores).max() > 1e-4  # the tuned adapter changed the scores


def test_export_merge_equals_the_adapter(run_dir, tmp_path, tokenizer):
    """`export --merge` writes a plain model folder that scores like base model + adapter."""
    import torch
    from click.testing import CliRunner
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mezo_vllm.cli import main

    result = CliRunner().invoke(main, ["export", str(run_dir), "--to", str(tmp_path / "merged"), "--merge"])
    assert result.exit_code == 0, result.output
    assert not list((tmp_path / "merged").glob("adapter_*"))
    ids = torch.tensor([tokenizer("a gorgeous, witty, seductive movie. It was great")["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(json.loads((run_dir / "adapter/adapter_config.json").read_text())["base_model_name_or_path"])
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, str(run_dir / "adapter"))(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-3
