"""MeZO (zeroth-order, forward-pass-only) LoRA fine-tuning on the vLLM inference engine."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mezo-vllm")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
