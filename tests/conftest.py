"""One vLLM engine per test session: starting one costs tens of seconds."""

from __future__ import annotations

import pytest

from mezo_vllm.adapter import LoraAdapter, LoraSpec, model_linear_shapes
from mezo_vllm.model import prepare_default_model


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reverse-order", action="store_true",
                     help="run the collected tests last to first: no test may depend on another's order "
                          "(pytest-random-order shuffles; this keeps module fixtures to one setup each)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--reverse-order"):
        items.reverse()


@pytest.fixture(scope="session")
def model_dir() -> str:
    return str(prepare_default_model())


@pytest.fixture(scope="session")
def initial_adapter(model_dir: str) -> LoraAdapter:
    """PEFT-initialised q_proj/v_proj adapter (B = 0), as `tune` starts from."""
    return LoraAdapter.init(LoraSpec(), model_linear_shapes(model_dir), seed=0)


@pytest.fixture(scope="session")
def engine_fp32(model_dir: str, initial_adapter: LoraAdapter):
    """The shared fp32 engine with the 8 variant slots of `tune`'s default 4 directions. Tests
    that change its master adapter or slots must not rely on what another test left there: load
    what they need first."""
    from mezo_vllm.config import TuneConfig
    from mezo_vllm.engine import EngineConfig, VllmEngine

    slots = 2 * TuneConfig(out="").directions
    return VllmEngine(EngineConfig(model=model_dir, dtype="float32", n_variants=slots), initial_adapter)


@pytest.fixture(scope="session")
def tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def random_adapter(initial_adapter: LoraAdapter) -> LoraAdapter:
    """An adapter with non-zero B, so that it changes the model's outputs."""
    import torch

    g = torch.Generator().manual_seed(123)
    tensors = {k: (torch.randn(v.shape, generator=g) * 0.05 if "lora_B" in k else v.clone())
               for k, v in initial_adapter.tensors.items()}
    return LoraAdapter(initial_adapter.spec, tensors)

