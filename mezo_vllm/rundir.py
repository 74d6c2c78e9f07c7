"""A run folder on disk: atomic folder writes, checkpoints, and the append-only logs.

Every folder a run publishes (`checkpoint/`, `adapter/`, a prepared model, an export) is
written under a temporary name beside its destination, fsynced and renamed in, so a crash at
any moment leaves the old folder or the new one, whole. Logs are JSONL, one record per line,
appended; a resumed run drops what was logged after its checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError
from tqdm import tqdm

from .adapter import AdapterError, LoraAdapter
from .settings import ConfigError

CHECKPOINT = "checkpoint"
_PREVIOUS = ".checkpoint-old"  # the previous checkpoint, for the moment the new one is renamed in


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Files and directory entries on disk before a rename publishes them."""
    for path in [*folder.rglob("*"), folder]:
        fsync(path)


def _swap_in(tmp: Path, dest: Path) -> None:
    """dest ← tmp by renames only. Until the first rename dest is the old folder; between the
    two it waits whole under `.<name>-old`, where `tidy_checkpoints` takes it back."""
    if dest.exists():
        trash = dest.parent / f".{dest.name}-old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(dest, trash)
        os.replace(tmp, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    fsync(dest.parent)


def write_whole(dest: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a temporary folder beside dest, which is synced and renamed in: a crash at
    any moment leaves either the old dest or the new one, whole."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide an adapter from a server run by another user
        write(tmp)
        fsync_tree(tmp)
        _swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tidy_checkpoints(run: Path) -> None:
    """What a save killed midway leaves: the previous checkpoint renamed aside (taken back) and
    half-written temporary folders (removed), so a resumed run sees one whole checkpoint."""
    current, previous = run / CHECKPOINT, run / _PREVIOUS
    if not current.exists() and (previous / "state.json").is_file():
        os.replace(previous, current)
    for stale in [*run.glob(".checkpoint-*"), *run.glob(".adapter-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(run: Path, adapter: LoraAdapter, base_model: str, step: int) -> None:
    tidy_checkpoints(run)

    def write(folder: Path) -> None:
        adapter.save(folder / "adapter", base_model)
        (folder / "state.json").write_text(json.dumps({"step": step}) + "\n")

    write_whole(run / CHECKPOINT, write)


def load_checkpoint(run: Path) -> tuple[LoraAdapter, int] | None:
    """The run's checkpoint (adapter, steps done), None if it has none; a damaged one is a
    ConfigError naming the file."""
    tidy_checkpoints(run)
    folder = run / CHECKPOINT
    state = folder / "state.json"
    if not state.exists():
        return None
    try:
        step = json.loads(state.read_text())["step"]
        if type(step) is not int or step < 0:
            raise ValueError(f"step {step!r} is not a count")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise ConfigError(f"{state}: unreadable ({type(e).__name__}: {e})".splitlines()[0]) from None
    try:
        return LoraAdapter.load(folder / "adapter"), step
    except AdapterError:
        raise
    except (OSError, ValueError, SafetensorError) as e:
        raise ConfigError(f"{folder / 'adapter'}: unreadable ({type(e).__name__}: {e})".splitlines()[0]) from None


# --------------------------------------------------------------------------- logs

def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _log_record(line: str) -> dict | None:
    """A log line as a record with an integer step (what resuming reads), or None."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and type(record.get("step")) is int else None


def read_log(path: Path) -> tuple[list[dict], bool]:
    """A run's log and whether its last line is torn (no newline, not JSON: the run was killed
    while writing it). A torn last line is always past the last checkpoint, which is written
    after its step's lines, so a resumed run drops it; a bad line anywhere else is refused."""
    if not path.exists():
        return [], False
    try:
        lines = path.read_text().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({type(e).__name__})") from None
    torn = bool(lines[-1].strip()) and _log_record(lines[-1]) is None
    records = []
    for number, line in enumerate(lines[:-1] if torn else lines, start=1):
        if not line.strip():
            continue
        record = _log_record(line)
        if record is None:
            raise ConfigError(f"{path}:{number}: not a JSON record with an integer step")
        records.append(record)
    return records, torn


def truncate_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    """Drop what a killed run logged after its last checkpoint: a resumed run logs it again.
    The file is replaced by a rename, so a kill now loses none of the lines kept."""
    records, torn = read_log(path)
    kept = [r for r in records if keep(r)]
    if torn:
        tqdm.write(f"{path}: dropped its torn last line (the run was killed while writing it)")
    if torn or len(kept) < len(records):
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
