"""The fp32 master adapter: seeded z, exact perturbations and updates, PEFT round trip."""

from __future__ import annotations

import math

import pytest
import torch

from mezo_vllm.adapter import (
    AdapterError, LoraAdapter, Update, model_linear_shapes, noise, resolve_targets,
)


def test_noise_is_a_function_of_seed_and_name():
    a = noise(5, "x", torch.Size([4, 3]))
    assert torch.equal(a, noise(5, "x", torch.Size([4, 3])))
    assert not torch.equal(a, noise(6, "x", torch.Size([4, 3])))
    assert not torch.equal(a, noise(5, "y", torch.Size([4, 3])))


def test_init_is_peft_initialisation(initial_adapter):
    modules = initial_adapter.modules()
    assert len(modules) == 60  # q_proj and v_proj of 30 layers
    a, b = modules["model.layers.0.self_attn.q_proj"]
    assert a.shape == (8, 576) and b.shape == (576, 8)
    assert not b.any()
    assert a.abs().max() <= 1 / math.sqrt(576) and a.std() > 0.5 / math.sqrt(3 * 576)
    _, v_b = modules["model.layers.0.self_attn.v_proj"]
    assert v_b.shape == (192, 8)


def test_perturbation_is_recomputed_from_the_master(initial_adapter):
    plus, minus, same = initial_adapter.variants([(7, 1e-2), (7, -1e-2), (7, 0.0)])
    key = next(iter(plus))
    z = noise(7, key, plus[key].shape)
    assert torch.equal(plus[key], initial_adapter.tensors[key] + 1e-2 * z)
    assert torch.equal(minus[key], initial_adapter.tensors[key] - 1e-2 * z)
    assert same[key] is initial_adapter.tensors[key]


def test_update_applies_decay_then_seeded_terms(initial_adapter):
    adapter = initial_adapter.copy()
    adapter.apply(Update(terms=((3, -0.5), (4, 0.25)), decay=0.1))
    for key, before in initial_adapter.tensors.items():
        expected = before * 0.9 - 0.5 * noise(3, key, before.shape) + 0.25 * noise(4, key, before.shape)
        assert torch.allclose(adapter.tensors[key], expected, atol=1e-7)


def test_targets(model_dir):
    shapes = model_linear_shapes(model_dir)
    assert set(resolve_targets(["all-linear"], shapes)) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(AdapterError, match="not_a_module"):
        resolve_targets(["q_proj", "not_a_module"], shapes)


def test_peft_round_trip(tmp_path, random_adapter, model_dir):
    random_adapter.save(tmp_path / "a", base_model=model_dir)
    loaded = LoraAdapter.load(tmp_path / "a")
    assert loaded.spec == random_adapter.spec
    assert all(torch.equal(loaded.tensors[k], v) for k, v in random_adapter.tensors.items())

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(tmp_path / "a"))
    peft_b = dict(model.named_parameters())["base_model.model.model.layers.3.self_attn.v_proj.lora_B.default.weight"]
    assert torch.equal(peft_b, random_adapter.tensors["base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"])


def test_pickled_adapter_is_refused(tmp_path, initial_adapter):
    initial_adapter.save(tmp_path, base_model="m")
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickled adapter_model.bin is refused"):
        LoraAdapter.load(tmp_path)
