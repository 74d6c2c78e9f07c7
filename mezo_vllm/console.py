"""The terminal of a run: our own lines (progress bar, dev metrics, notes) on it, and everything
vLLM, torch and their workers print in `RUN/engine.log` instead (unless --verbose).

vLLM logs through its `vllm` logger to the stdout it saw when it configured logging, its
workers (other processes under tensor parallelism) print on the descriptors they inherit,
torch warns through `warnings` and from C++, and the model loader draws tqdm bars on stderr.
None of it is ours to filter one by one, so while a run is `quiet` file descriptors 1 and 2
themselves point at the log, which catches all of it, in this process and in any it starts;
our lines go to a copy of the terminal's stderr taken before.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO

from tqdm import tqdm

_terminal: TextIO | None = None  # the terminal's stderr while a run is quiet


def stream() -> TextIO:
    """Where our lines and the progress bar go."""
    return _terminal or sys.stderr


def say(message: str) -> None:
    """One line of ours, above the progress bar if one is drawn."""
    tqdm.write(message, file=stream())


def _descriptor(f: TextIO) -> int | None:
    try:
        return f.fileno()
    except (AttributeError, OSError, ValueError):  # a test runner's or a notebook's stream
        return None


@contextlib.contextmanager
def quiet(log: Path, verbose: bool = False) -> Iterator[None]:
    """Descriptors 1 and 2 appended to `log` for the block; `say` and `stream()` still reach the
    terminal. `verbose`: nothing is redirected."""
    global _terminal
    if verbose:
        yield
        return
    for f in (sys.stdout, sys.stderr):
        f.flush()
    # our lines keep going where sys.stderr goes: a copy of descriptor 2 if it writes there
    # (it is about to point at the log), else the stream itself (a test runner's capture)
    terminal = os.fdopen(os.dup(2), "w", buffering=1) if _descriptor(sys.stderr) == 2 else None
    saved = [os.dup(1), os.dup(2)]
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(log_fd, f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {' '.join(sys.argv)}\n".encode())
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    _terminal = terminal or sys.stderr
    try:
        yield
    finally:
        for f in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):  # a full disk: the log lost its last lines
                f.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)
        _terminal = None
        if terminal is not None:
            terminal.close()
