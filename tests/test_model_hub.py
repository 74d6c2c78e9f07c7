"""`--model org/name`: downloaded from a hub that answers (a local stand-in of the HF hub's API),
and one plain line where none does: HF_HUB_OFFLINE, a refused or a silent endpoint, no such model.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported, so each case runs in a
fresh Python process; every one has a timeout, and a silent hub is given 1 s to answer.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SHA = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = "from mezo_vllm.model import resolve_model; print(resolve_model({!r}))"


def _hub_files(folder: Path) -> dict[str, bytes]:
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}, str(folder / "model.safetensors"))
    return {"config.json": b'{"model_type": "llama"}', "model.safetensors": (folder / "model.safetensors").read_bytes(),
            "tokenizer.json": b"{}", "tokenizer_config.json": b"{}", "chat_template.jinja": b"{{ messages }}",
            "pytorch_model.bin": b"pickle", "README.md": b"# tiny", "onnx/model.onnx": b"onnx"}


class _Hub(http.server.BaseHTTPRequestHandler):
    """The calls a snapshot download makes: model info (of "main"), the file tree, each file."""

    files: dict[str, bytes] = {}

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = self.path.split("?")[0]
        if path in ("/api/models/org/tiny", "/api/models/org/tiny/revision/main"):
            self._send(json.dumps({"id": "org/tiny", "sha": SHA, "siblings": [{"rfilename": f} for f in self.files]}).encode(), body)
        elif path == f"/api/models/org/tiny/tree/{SHA}":
            self._send(json.dumps([{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                   for f, b in self.files.items()]).encode(), body)
        elif path.startswith(f"/org/tiny/resolve/{SHA}/") and path.split(f"/{SHA}/", 1)[1] in self.files:
            data = self.files[path.split(f"/{SHA}/", 1)[1]]
            self._send(data, body, {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def _send(self, data: bytes, body: bool, headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        for k, v in {"Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub(tmp_path) -> Iterator[str]:
    _Hub.files = _hub_files(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_DISABLE_TELEMETRY": "1",
                   "HF_HUB_ETAG_TIMEOUT": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "1", **env}
    for offline in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # only where a test sets it
        if offline not in env:
            environment.pop(offline, None)
    return subprocess.run([sys.executable, *args], env=environment, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


def test_a_hub_id_downloads_weights_configs_and_tokenizer_files_only(tmp_path, hub):
    done = _run(["-c", RESOLVE.format("org/tiny")], tmp_path, HF_ENDPOINT=hub)
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert folder.parts[-2:] == ("snapshots", SHA) and str(tmp_path / "hf-cache") in str(folder)
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == [
        "chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    # downloaded once, the model is used offline from the cache
    again = _run(["-c", RESOLVE.format("org/tiny")], tmp_path, HF_HUB_OFFLINE="1")
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == str(folder), again.stderr


def test_a_model_the_hub_does_not_have(tmp_path, hub):
    done = _run(["-c", RESOLVE.format("org/missing")], tmp_path, HF_ENDPOINT=hub)
    assert f"org/missing: no such folder, and as a hub id it cannot be downloaded: the hub at {hub} has no model " \
           "'org/missing' (HTTP 404" in done.stderr.splitlines()[-1]


def test_offline_is_said_in_one_line_by_the_command(tmp_path):
    done = _run(["-m", "mezo_vllm", "tune", "--model", "org/name", "--task", "sst2", "--out", "run"], tmp_path,
                HF_HUB_OFFLINE="1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: org/name: no such folder, and as a hub id it cannot be downloaded: HF_HUB_OFFLINE is set and the "
        f"HF cache ({tmp_path / 'hf-cache'}) does not hold it; download it where the hub is reachable and pass its folder"]
    assert not (tmp_path / "run").exists()


def test_a_refused_endpoint_is_not_reachable(tmp_path):
    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = _run(["-c", RESOLVE.format("org/name")], tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "ModelError" in line
    assert f"the hub at http://127.0.0.1:{port} is not reachable from here (ConnectError" in line


def test_a_silent_endpoint_times_out_instead_of_hanging(tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.perf_counter()
        done = _run(["-c", RESOLVE.format("org/name")], tmp_path,
                    HF_ENDPOINT=f"http://127.0.0.1:{silent.getsockname()[1]}")
        elapsed = time.perf_counter() - started
    assert "is not reachable from here (no answer within 1 s)" in done.stderr.strip().splitlines()[-1]
    assert elapsed < 60


def test_an_existing_folder_is_never_taken_for_a_hub_id(tmp_path):
    (tmp_path / "org" / "name").mkdir(parents=True)
    done = _run(["-c", RESOLVE.format("org/name")], tmp_path, HF_ENDPOINT="http://127.0.0.1:9")
    assert "org/name: not an HF model folder (no config.json)" in done.stderr.strip().splitlines()[-1]
