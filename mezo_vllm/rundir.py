"""A run folder on disk: atomic folder writes, checkpoints, the append-only logs, the lock.

Every folder a run publishes (`checkpoint/`, `adapter/`, `best/`, a prepared model, an export)
is written under a temporary name beside its destination, fsynced and renamed in, so a crash at
any moment leaves the old folder or the new one, whole. Logs are JSONL, one record per line,
appended; a resumed run drops what was logged after its checkpoint. One process at a time
writes a run folder (`locked`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from safetensors import SafetensorError

from . import console
from .adapter import AdapterError, LoraAdapter
from .settings import ConfigError

CHECKPOINT = "checkpoint"
_PREVIOUS = ".checkpoint-old"  # the previous checkpoint, for the moment the new one is renamed in
NUMBERED = "checkpoint-"  # + step: the numbered checkpoints kept by --save-total-limit
LOCK = ".lock"


def disk_full(error: BaseException) -> bool:
    """No space (or quota) left: what a save or a log append may hit that no retry fixes.
    safetensors names the OS error only in its message ("... No space left on device (os error 28)")."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, SafetensorError) and any(f"(os error {n})" in str(error)
                                                      for n in (errno.ENOSPC, errno.EDQUOT))


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
        write(tmp)
        _readable(tmp)
        fsync_tree(tmp)
        _swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _readable(folder: Path) -> None:
    """mkdtemp's 0700 and safetensors' 0600 would hide a published folder from a server run by
    another user: folders 0755, files 0644."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def write_file(dest: Path, text: str) -> None:
    """A small file replaced whole (written beside it, synced, renamed in)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def tidy_checkpoints(run: Path) -> None:
    """What a save killed midway leaves: the previous checkpoint renamed aside (taken back) and
    half-written temporary folders (removed), so a resumed run sees one whole checkpoint."""
    current, previous = run / CHECKPOINT, run / _PREVIOUS
    if not current.exists() and (previous / "state.json").is_file():
        os.replace(previous, current)
    for stale in [*run.glob(".checkpoint-*"), *run.glob(".adapter-*"), *run.glob(".best-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(run: Path, adapter: LoraAdapter, base_model: str, step: int,
                    best: tuple[dict, LoraAdapter] | None = None) -> None:
    """`checkpoint/`: the adapter after `step` steps, and the best dev adapter so far with its
    record (what `best/` holds), so that a resumed run publishes the best an uninterrupted one
    would, even when `best/` was rewritten after this checkpoint."""
    tidy_checkpoints(run)

    def write(folder: Path) -> None:
        adapter.save(folder / "adapter", base_model)
        state: dict = {"step": step}
        if best is not None:
            state["best"] = best[0]
            best[1].save(folder / "best", base_model)
        (folder / "state.json").write_text(json.dumps(state) + "\n")

    write_whole(run / CHECKPOINT, write)


def load_best(run: Path) -> tuple[dict, LoraAdapter] | None:
    """The best dev record and adapter the checkpoint holds, None if it has none (one written
    before any evaluation, or by an older version); called after `load_checkpoint`."""
    folder = run / CHECKPOINT
    best = json.loads((folder / "state.json").read_text()).get("best")
    if best is None:
        return None
    if not (isinstance(best, dict) and type(best.get("step")) is int and isinstance(best.get("metric"), str)
            and isinstance(best.get("value"), (int, float))):
        raise ConfigError(f"{folder / 'state.json'}: 'best' is not a record of step, metric and value")
    try:
        return best, LoraAdapter.load(folder / "best")
    except (OSError, ValueError, SafetensorError) as e:
        raise ConfigError(f"{folder / 'best'}: unreadable ({type(e).__name__}: {e})".splitlines()[0]) from None


def numbered_checkpoints(run: Path) -> dict[int, Path]:
    """step → `checkpoint-STEP/`, the adapters --save-total-limit keeps."""
    found = {}
    for path in run.glob(f"{NUMBERED}*"):
        suffix = path.name[len(NUMBERED):]
        if suffix.isdigit() and path.is_dir():
            found[int(suffix)] = path
    return dict(sorted(found.items()))


def prune_numbered(run: Path, keep: int, after: int | None = None) -> None:
    """Keep the newest `keep` numbered checkpoints (none past step `after`: a resumed run's
    stale ones, from the sitting that was killed after its last checkpoint)."""
    steps = numbered_checkpoints(run)
    current = [s for s in steps if after is None or s <= after]
    kept = set(current[-keep:]) if keep else set()
    for step, path in steps.items():
        if step not in kept:  # renamed first, so a kill mid-removal leaves no half checkpoint-STEP/
            trash = run / f".{path.name}-old"
            os.replace(path, trash)
            shutil.rmtree(trash)


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

@contextlib.contextmanager
def locked(run: Path) -> Iterator[None]:
    """This process alone writes `run` (an flock on `run/.lock`, which names its pid), until the
    block ends; the kernel drops the lock of a killed process, so a stale file never blocks.
    A second writer is refused at once (ConfigError naming the pid)."""
    path = run / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"{run}: cannot write its lock file {LOCK} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"{run}: another process (pid {holder}) is writing this run folder; "
                              "wait for it to end or stop it") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder removed the file as it ended: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the unlock, so no one locks a file being removed
        os.close(fd)


def clear(run: Path) -> None:
    """Empty a run folder for --overwrite, keeping the lock this process holds on it."""
    for path in run.iterdir():
        if path.name == LOCK:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


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
        console.say(f"{path}: dropped its torn last line (the run was killed while writing it)")
    if torn or len(kept) < len(records):
        write_file(path, "".join(json.dumps(r) + "\n" for r in kept))
