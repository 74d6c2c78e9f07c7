"""MeZO (zeroth-order, forward-pass-only) LoRA fine-tuning on the vLLM inference engine.

The Python API is `tune(TuneConfig(...), data=[...])` (`trainer.tune`, `config.TuneConfig`).
Both are imported on first use, so `import mezo_vllm` stays light (no torch, no vLLM).
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("mezo-vllm")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["TuneConfig", "__version__", "tune"]


def __getattr__(name: str) -> Any:
    if name == "tune":
        from .trainer import tune

        return tune
    if name == "TuneConfig":
        from .config import TuneConfig

        return TuneConfig
    raise AttributeError(f"module 'mezo_vllm' has no attribute {name!r}")
