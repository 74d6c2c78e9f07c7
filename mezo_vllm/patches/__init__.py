"""Changes to vLLM internals that mezo-vllm depends on, one module per change.

Each module says what upstream vLLM does, what it changes and why, and which vLLM versions it
was written for; `apply()` refuses any other version and is idempotent. `apply_all()` applies
the ones the engine asks for, in the process that runs the model (the engine runs in-process).
"""

from __future__ import annotations

from types import ModuleType


class PatchVersionError(RuntimeError):
    """vLLM is a version a patch was not written for: running it anyway would be a guess."""


def check_version(patch: str, supported: tuple[str, ...]) -> None:
    import vllm

    if vllm.__version__ not in supported:
        raise PatchVersionError(
            f"patch {patch!r} was written for vLLM {', '.join(supported)}, "
            f"but vLLM {vllm.__version__} is installed: install a supported vLLM "
            "or port the patch (see its docstring for what it changes)"
        )


def mark_applied(owner: object, name: str) -> bool:
    """Record that patch `name` is on `owner`; False when it already was (idempotence)."""
    flag = f"_mezo_vllm_patch_{name}"
    if getattr(owner, flag, False):
        return False
    setattr(owner, flag, True)
    return True


def required() -> list[ModuleType]:
    """The patches without which mezo-vllm cannot run on this vLLM at all."""
    from . import lora_prompt_logprobs

    return [lora_prompt_logprobs]


def speedups() -> list[ModuleType]:
    """The patches that make the engine fast; `fast=False` engines (the bench's stock vLLM) skip them."""
    from . import compiled_lora, fast_cpu_lora, prefix_sharing, span_logprobs

    return [fast_cpu_lora, compiled_lora, span_logprobs, prefix_sharing]


def apply_all(modules: list[ModuleType]) -> None:
    for module in modules:
        module.apply()
