"""`mezo-vllm serve`, tested as users serve: the real vLLM OpenAI-compatible server on a loopback
port, asked over plain HTTP the way an OpenAI client asks, checked against PEFT on transformers.

Two servers for the module (about a minute each to start here): a run folder's adapter, with
an API key, and the same adapter merged by `export --merge`, served without LoRA. Each is
started in its own process group, must answer within START_TIMEOUT seconds, and is always
stopped, group and all. The command-line checks at the top start nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from click.testing import CliRunner
from listeners import is_loopback, listening

from mezo_vllm import serve as serving
from mezo_vllm.adapter import LoraAdapter, LoraSpec, model_linear_shapes
from mezo_vllm.cli import main
from mezo_vllm.config import ConfigError, TuneConfig

KEY = "test-key-not-a-secret"
MAX_LEN = 256  # the run's --max-length, which the server must take as its max_model_len
START_TIMEOUT = 300
TOL = 1e-4  # fp32 server vs fp32 PEFT, per token
PROMPTS = [  # SST-2 in MeZO's template (task sst2-mezo), "<sentence> It was" + option, and an unrelated text
    "a gorgeous, witty, seductive movie. It was great",
    "a gorgeous, witty, seductive movie. It was terrible",
    "the plot is lifeless and the acting is worse. It was",
    "The weather today is cold and wet, and the trains are late again.",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model_dir) -> Path:
    """A run folder laid out as `tune` writes it (config.json, trajectory.jsonl, adapter/). Its
    adapter moves log-probs far beyond the tolerance, so that a wrong scaling, rank or module in
    the served path shows: rank 4 (served with --max-lora-rank 8), α 16, q/v (packed into vLLM's
    qkv_proj without k) and down_proj, random B."""
    run = tmp_path_factory.mktemp("serve") / "sst2-run"
    spec = LoraSpec(r=4, alpha=16.0, targets=("q_proj", "v_proj", "down_proj"))
    adapter = LoraAdapter.init(spec, model_linear_shapes(model_dir), seed=0)
    g = torch.Generator().manual_seed(7)
    for key, t in adapter.tensors.items():
        if "lora_B" in key:
            adapter.tensors[key] = torch.randn(t.shape, generator=g) * 0.02
    adapter.save(run / "adapter", model_dir)
    cfg = TuneConfig(out=str(run), task="sst2", rank=spec.r, alpha=spec.alpha, targets=spec.targets,
                     max_length=MAX_LEN)
    (run / "config.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    (run / "trajectory.jsonl").write_text("")
    return run


def _serve(*args: str):
    return CliRunner().invoke(main, ["serve", *args])


@pytest.fixture
def no_exec(monkeypatch):
    """A command-line test that gets past its checks must not turn pytest into a server."""
    def refuse(command, env):
        raise AssertionError(f"would have started the server: {command}")

    monkeypatch.setattr(serving, "exec_server", refuse)


def test_command_derived_from_the_run(run_dir, model_dir):
    result = _serve(str(run_dir), "--api-key", KEY, "--dry-run", "--", "--enforce-eager")
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    assert KEY not in line  # the key goes to the server in its environment, never on a command line
    env, command = line.split(sys.executable)
    assert env.split() == ["MEZO_VLLM_WORKER_PATCHES=serve", "VLLM_API_KEY=<key>"]
    for flags in (f"-m {serving.SERVER_MODULE} --model {model_dir}",
                  "--host 127.0.0.1 --port 8000", "--dtype float32", "--enable-lora",
                  f"--lora-modules sst2-run={(run_dir / 'adapter').resolve()}", "--max-lora-rank 8",
                  f"--max-model-len {MAX_LEN}", "--served-model-name smollm2-135m"):
        assert flags in command, flags
    assert command.endswith("--enforce-eager")  # after ours, so the user's flags win


def test_command_for_a_model_folder(model_dir):
    result = _serve(model_dir, "--host", "0.0.0.0", "--dtype", "bfloat16", "--dry-run")
    assert result.exit_code == 0, result.output
    command = result.output.strip()
    assert command.startswith(sys.executable)  # no patch in the environment without LoRA
    assert "--enable-lora" not in command and "--max-model-len" not in command
    assert "--host 0.0.0.0" in command and "--dtype bfloat16" in command


@pytest.mark.parametrize("rank, expected", [(1, 1), (2, 8), (4, 8), (8, 8), (9, 16), (300, 320), (512, 512)])
def test_lora_rank_is_rounded_up_to_one_vllm_accepts(rank, expected):
    assert serving.lora_rank_for_vllm(rank) == expected


def test_a_rank_vllm_cannot_serve_is_refused():
    with pytest.raises(ConfigError, match="up to 512"):
        serving.lora_rank_for_vllm(513)


def _occupied_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"),
    ("file", "not a folder"),
    ("empty", "not a run folder (adapter/), an adapter folder"),
    ("unfinished", "the run has no adapter/ yet (has it finished?); serve its last checkpoint with: "
                   "mezo-vllm serve"),
    ("base moved", "pass --model DIR if it moved"),
    ("pickled", "pickled adapter_model.bin is refused"),
    ("port in use", "is in use (another server?); choose another --port"),
    ("not our host", "--host 192.0.2.123: not an address of this machine"),
])
def test_bad_input_is_one_line(tmp_path, run_dir, no_exec, case, message):
    target, extra, held = tmp_path / "target", [], None
    if case == "file":
        target.write_text("x")
    elif case == "empty":
        target.mkdir()
    elif case == "unfinished":
        target.mkdir()
        (target / "trajectory.jsonl").write_text("")
        LoraAdapter.load(run_dir / "adapter").save(target / "checkpoint" / "adapter", "x")
    elif case == "base moved":
        LoraAdapter.load(run_dir / "adapter").save(target, str(tmp_path / "gone"))
    elif case == "pickled":
        target.mkdir()
        (target / "adapter_config.json").write_text((run_dir / "adapter" / "adapter_config.json").read_text())
        (target / "adapter_model.bin").write_bytes(b"")
    elif case == "port in use":
        target, held = run_dir, _occupied_port()
        extra = ["--port", str(held.getsockname()[1])]
    elif case == "not our host":
        target, extra = run_dir, ["--host", "192.0.2.123"]
    try:
        result = _serve(str(target), *extra)
    finally:
        if held:
            held.close()
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


# --------------------------------------------------------------------------- the real server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mezo-vllm serve ARGS --port P` in a process group of its own (the command becomes
    vLLM's server, which starts an engine core and a worker process)."""

    def __init__(self, target: Path, *options: str, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cli = Path(sys.executable).parent / "mezo-vllm"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([str(cli), "serve", str(target), "--port", str(self.port), *options],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()
        try:
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - self.started

    def _wait_until_up(self) -> None:
        while time.monotonic() - self.started < START_TIMEOUT:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"the server did not answer within {START_TIMEOUT} s:\n{self.tail()}")

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])

    def stop(self) -> None:
        """SIGTERM to the group (vLLM shuts its engine down), SIGKILL to whatever is left."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def request(self, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
        """(HTTP status, JSON body), as an OpenAI client sends it (Bearer key, JSON body)."""
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def prompt_logprobs(self, model: str, key: str | None = None) -> list[np.ndarray]:
        """Per-token log-probs of PROMPTS (one request, so one batch): `echo` + `logprobs` with no
        new token, the way evaluation harnesses score text (and the README's curl example)."""
        status, out = self.request("/v1/completions", {"model": model, "prompt": PROMPTS, "max_tokens": 0,
                                                       "echo": True, "logprobs": 0}, key)
        assert status == 200, (status, out, self.tail())
        choices = sorted(out["choices"], key=lambda c: c["index"])
        assert [c["text"] for c in choices] == PROMPTS
        values = [c["logprobs"]["token_logprobs"] for c in choices]
        assert all(v[0] is None for v in values)  # the first token has no context
        return [np.array(v[1:], dtype=np.float64) for v in values]


def _token_logprobs(model, tokenizer, texts: list[str]) -> list[np.ndarray]:
    """log p(token | tokens before) for tokens 1..n of each text, tokenized as vLLM's completions
    endpoint tokenizes a text prompt (special tokens added as the tokenizer adds them)."""
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        picked = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append(picked.double().numpy())
    return out


@pytest.fixture(scope="module")
def peft(run_dir, model_dir) -> dict[str, list[np.ndarray]]:
    """The oracle: PROMPTS scored by transformers + PEFT in fp32 from the files the server reads,
    with the adapter and with it disabled (the base model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    with_adapter = _token_logprobs(model, tokenizer, PROMPTS)
    with model.disable_adapter():
        without = _token_logprobs(model, tokenizer, PROMPTS)
    return {"adapter": with_adapter, "base": without}


@pytest.fixture(scope="module")
def lora_server(run_dir, tmp_path_factory):
    """The run served as the README says, default host, with an API key."""
    server = Server(run_dir, "--api-key", KEY, log=tmp_path_factory.mktemp("logs") / "lora.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def merged_server(run_dir, tmp_path_factory):
    """The run's adapter merged into the base model by `export --merge`, served without LoRA."""
    merged = tmp_path_factory.mktemp("export") / "sst2-merged"
    result = CliRunner().invoke(main, ["export", str(run_dir), "--to", str(merged), "--merge"])
    assert result.exit_code == 0, result.output
    # eager: vLLM would otherwise compile the model for ~100 s here (with LoRA it runs eager anyway)
    server = Server(merged, "--", "--enforce-eager", log=tmp_path_factory.mktemp("logs") / "merged.log")
    yield server
    server.stop()


def _max_delta(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]  # same tokenization
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.mark.slow
def test_the_adapter_and_its_base_are_listed(lora_server):
    status, out = lora_server.request("/v1/models", key=KEY)
    assert status == 200, out
    models = {m["id"]: m for m in out["data"]}
    assert set(models) == {"sst2-run", "smollm2-135m"}
    assert models["sst2-run"]["parent"] == "smollm2-135m"
    assert models["smollm2-135m"]["max_model_len"] == MAX_LEN  # the run's --max-length


@pytest.mark.slow
def test_served_adapter_log_probs_equal_peft(lora_server, peft):
    """The adapter's and the base model's log-probs each equal PEFT's, and differ from each other
    by far more than that: asked one after the other, then three times at once, so that they
    share a batch (stock vLLM on CPU gives the base requests of such a batch the adapter)."""
    adapter, base = (lora_server.prompt_logprobs(name, KEY) for name in ("sst2-run", "smollm2-135m"))
    assert _max_delta(adapter, peft["adapter"]) < TOL
    assert _max_delta(base, peft["base"]) < TOL
    assert _max_delta(adapter, base) > 100 * TOL
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            futures = [pool.submit(lora_server.prompt_logprobs, name, KEY) for name in ("sst2-run", "smollm2-135m")]
            adapter, base = (f.result() for f in futures)
            assert _max_delta(adapter, peft["adapter"]) < TOL
            assert _max_delta(base, peft["base"]) < TOL


@pytest.mark.slow
def test_requests_without_the_key_are_refused(lora_server):
    body = {"model": "sst2-run", "prompt": PROMPTS[0], "max_tokens": 1}
    assert lora_server.request("/v1/completions", body)[0] == 401
    assert lora_server.request("/v1/completions", body, key="wrong")[0] == 401
    assert lora_server.request("/v1/models")[0] == 401
    assert lora_server.request("/v1/completions", body, key=KEY)[0] == 200
    processes = [psutil.Process(lora_server.proc.pid), *psutil.Process(lora_server.proc.pid).children(recursive=True)]
    assert not any(KEY in " ".join(p.cmdline()) for p in processes)  # `ps` does not show it


@pytest.mark.slow
def test_the_server_listens_on_loopback_only(lora_server):
    sockets = listening(lora_server.proc.pid)
    assert any(port == lora_server.port for *_, port in sockets), sockets
    assert all(is_loopback(address) for _, _, address, _ in sockets), sockets


@pytest.mark.slow
def test_merged_export_serves_the_adapters_log_probs(merged_server, peft):
    status, out = merged_server.request("/v1/models")
    assert status == 200, out
    assert [m["id"] for m in out["data"]] == ["sst2-merged"]
    merged = merged_server.prompt_logprobs("sst2-merged")
    assert _max_delta(merged, peft["adapter"]) < TOL
    assert _max_delta(merged, peft["base"]) > 100 * TOL
