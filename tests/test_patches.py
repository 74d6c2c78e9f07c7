"""What every patch promises: it refuses a vLLM it was not written for, and applies once."""

from __future__ import annotations

import pytest
import torch
import vllm

from mezo_vllm import patches
from mezo_vllm.patches import PatchVersionError, check_version, lora_prompt_logprobs

ALL = patches.required() + patches.speedups()


@pytest.mark.parametrize("patch", ALL, ids=lambda m: m.NAME)
def test_refuses_other_vllm_versions(patch, monkeypatch):
    assert vllm.__version__ in patch.SUPPORTED
    monkeypatch.setattr(vllm, "__version__", "0.0.0")
    with pytest.raises(PatchVersionError, match=f"'{patch.NAME}'.*0.0.0"):
        check_version(patch.NAME, patch.SUPPORTED)
    with pytest.raises(PatchVersionError, match=patch.NAME):
        patch.apply()


@pytest.mark.parametrize("patch", ALL, ids=lambda m: m.NAME)
def test_every_patch_documents_what_it_changes(patch):
    doc = patch.__doc__ or ""
    assert "Upstream" in doc and "Change" in doc and "0.32.0" in doc, patch.NAME


def test_lora_logits_per_slot_skips_rows_without_adapter():
    """lora_prompt_logprobs: rows of slot s get x·Aₛᵀ·Bₛᵀ·scale, rows of slot -1 nothing."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    a = torch.randn(3, 1, 2, 5, generator=g)
    b = torch.randn(3, 1, 7, 2, generator=g)
    b[2].zero_()  # a slot whose lm_head LoRA is zero (adapter without lm_head): skipped
    indices = torch.tensor([0, 0, -1, 1, 2, 1])
    y = torch.zeros(6, 7)
    lora_prompt_logprobs.add_lora_per_slot(y, x, a, b, indices, 0.5)
    expected = torch.zeros(6, 7)
    for row, slot in enumerate(indices.tolist()):
        if slot >= 0:
            expected[row] = 0.5 * x[row] @ a[slot, 0].T @ b[slot, 0].T
    torch.testing.assert_close(y, expected)
    assert not y[2].any() and not y[4].any()


@pytest.mark.parametrize("patch", ALL, ids=lambda m: m.NAME)
def test_a_local_build_suffix_is_the_version_it_builds(patch, monkeypatch):
    """`0.32.0+cpu`, `0.32.0+cu130`: builds of 0.32.0, which the patches were written for."""
    for build in ("0.32.0+cpu", "0.32.0+cu130"):
        monkeypatch.setattr(vllm, "__version__", build)
        check_version(patch.NAME, patch.SUPPORTED)
    monkeypatch.setattr(vllm, "__version__", "0.32.1+cpu")
    with pytest.raises(PatchVersionError, match="0.32.1"):
        check_version(patch.NAME, patch.SUPPORTED)
