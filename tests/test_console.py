"""The quiet terminal: while a run is quiet, everything but our own lines goes to RUN/engine.log
(vLLM's logger, Python and C++ warnings, a worker process's prints, the loader's tqdm bars);
--verbose leaves it all on the terminal. A child process has real file descriptors 1 and 2, as
the CLI does; the real CLI's output is checked in test_reliability.py's Ctrl-C/SIGKILL test."""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHILD = r"""
import logging, os, subprocess, sys, warnings
from pathlib import Path
from tqdm import tqdm
from mezo_vllm import console

logging.getLogger("vllm").addHandler(logging.StreamHandler(sys.stdout))  # as vLLM sets up its logger
log, verbose = Path(sys.argv[1]), sys.argv[2] == "verbose"
with console.quiet(log, verbose):
    logging.getLogger("vllm").warning("vLLM WARNING")
    warnings.warn("torch FutureWarning", FutureWarning)
    os.write(2, b"C++ warning\n")
    subprocess.run([sys.executable, "-c", "print('worker print')"], check=True)
    for _ in tqdm(range(2), desc="Loading shards"):
        pass
    print("plain print")
    console.say("our line")
    for _ in tqdm(range(2), desc="MeZO", file=console.stream()):
        pass
print("after the run")
"""
THEIRS = ["vLLM WARNING", "torch FutureWarning", "C++ warning", "worker print", "Loading shards", "plain print"]


@pytest.mark.parametrize("verbose", [False, True])
def test_only_our_lines_reach_the_terminal_unless_verbose(tmp_path, verbose):
    log = tmp_path / "engine.log"
    child = subprocess.run([sys.executable, "-c", _CHILD, str(log), "verbose" if verbose else "quiet"],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    terminal = child.stdout + child.stderr
    assert "our line\n" in child.stderr and "MeZO: 100%" in child.stderr
    assert child.stdout.endswith("after the run\n")
    for line in THEIRS:
        assert (line in terminal) == verbose, line
        if not verbose:
            assert line in log.read_text(), line
    assert log.exists() != verbose
    if not verbose:
        assert "our line" not in log.read_text() and "after the run" not in log.read_text()


def test_the_cli_passes_verbose_to_the_run(tmp_path, monkeypatch):
    import mezo_vllm.trainer
    from click.testing import CliRunner

    from mezo_vllm.cli import main

    seen: list[dict] = []
    monkeypatch.setattr(mezo_vllm.trainer, "tune", lambda cfg, **kwargs: seen.append(kwargs))
    for extra in (["--verbose"], []):
        result = CliRunner().invoke(main, ["tune", "--task", "sst2", "--out", str(tmp_path / "run"), *extra])
        assert result.exit_code == 0, result.output
    assert [kwargs["verbose"] for kwargs in seen] == [True, False]
