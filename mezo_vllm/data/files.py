"""User data files: JSONL and CSV, read into records that `records.py` validates one by one.

A JSONL file (`.jsonl`, `.json`) holds one JSON object per line; a CSV file (`.csv`) a header row
naming the fields, one record per row after it. Bad data is reported as a `DataError` whose
one-line message names file, line and field, never as a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import reprlib
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .records import CHAT, FIELDS, form_of, json_type, stored, to_dataset
from .types import DataError, Dataset, error


def load_file(path: str | Path, chat_tokenizer: Callable[[], Any] | None = None) -> Dataset:
    """Load a JSONL or CSV file of records in one of the forms of `records.py`: completion,
    classification, text or (JSONL only) chat; `chat_tokenizer` gives the tokenizer whose chat
    template renders chat records.

    A CSV file has a header row with the columns of one form, `prompt,completion`,
    `prompt,options,label` or `text`, where `options` is a JSON list string such as
    `["no", "yes"]`, so that both formats share one validation and options may be any number.
    Other fields or columns are ignored, with a warning; blank lines are skipped. An empty
    prompt is allowed (the text may carry everything), an empty completion or option is not:
    there would be nothing to score.
    """
    source = str(path)
    suffix = Path(path).suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise error(source, None, "file",
                     f"unknown extension {suffix or '(none)'!r}: expected .jsonl, .json or .csv")
    text = _read_text(Path(path), source)
    records = _csv_records(text, source) if suffix == ".csv" else _jsonl_records(text, source)
    dataset = to_dataset(((f"{source}:{line}", record) for line, record in records), source, "file",
                         chat_tokenizer)
    if dataset is None:
        raise error(source, None, "file", "no records")
    return dataset


def first_form(path: str | Path) -> str | None:
    """The form of a data file's first record ("chat", "text", ...), read without loading the
    file, or None when it cannot be told: how `serve` says prompts are to be sent."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            first = next((line for line in f if line.strip()), None)
        if first is None:
            return None
        record = (dict.fromkeys(name.strip() for name in next(csv.reader([first])))
                  if Path(path).suffix.lower() == ".csv" else json.loads(first))
        return form_of(record, str(path)) if isinstance(record, dict) else None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, csv.Error, DataError):
        return None


def save_records(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Valid records as a JSONL file that `load_file` reads back as the same examples (written
    whole: a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write("".join(json.dumps(stored(r), ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_text(path: Path, source: str) -> str:
    if path.exists() and not path.is_file():  # a FIFO would block read_bytes() forever
        raise error(source, None, "file", "not a regular file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(source, None, "file", f"cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")  # a BOM is what spreadsheet exports put first
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(source, line, "file", f"not UTF-8 (byte {data[e.start]:#04x})") from None


def _json_loads(text: str, source: str, line: int, field: str, what: str) -> Any:
    """json.loads, with the errors that are not JSONDecodeError (deep nesting, long integers)
    turned into DataError as well."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(source, line, field, f"{what} ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise error(source, line, field, f"{what} (nested too deeply)") from None
    except ValueError:  # an integer longer than Python's int/str conversion limit
        raise error(source, line, field, f"{what} (a number has more than "
                     f"{sys.get_int_max_str_digits()} digits)") from None


def _jsonl_records(text: str, source: str) -> Iterator[tuple[int, Any]]:
    # Split on "\n" only: JSON strings may hold raw U+2028 etc., which splitlines() breaks on.
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        record = _json_loads(raw, source, line, "record", "malformed JSON")
        if not isinstance(record, dict):
            raise error(source, line, "record", f"must be a JSON object, got {json_type(record)}")
        yield line, record


def _csv_records(text: str, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    # The csv module refuses cells over 128 KiB by default; the file is in memory already, so
    # no cell can be longer than it (the limit is process-wide, and only ever raised here).
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    # strict: a quote left open would otherwise swallow the rest of the file into one cell
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    while True:
        line = reader.line_num + 1  # where the next record starts; quoted cells may span lines
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if str(e) == "unexpected end of data":
                raise error(source, line, "record", "unterminated quote: a quoted cell that starts "
                             "in this record runs to the end of the file") from None
            if "expected after" in str(e):
                raise error(source, reader.line_num, "record", "text after a closing quote "
                             '(a quote inside a quoted cell is written "")') from None
            raise error(source, line, "record", f"malformed CSV ({e})") from None
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if header is None:
            header = [name.strip() for name in row]
            twice = [name for name, count in Counter(header).items() if count > 1 and name]
            if twice:
                raise error(source, line, twice[0], "column appears more than once in the header row")
            form = form_of(dict.fromkeys(header), f"{source}:{line}")  # a header without a form fails here
            if form == CHAT:
                raise error(source, line, "messages", "chat records are JSONL only (a conversation is a list of objects)")
            missing = [name for name in FIELDS[form] if name not in header]
            if missing:
                raise error(source, line, missing[0], "missing column in the header row")
            continue
        record: dict[str, Any] = dict(zip(header, row))
        if "options" in record:
            record["options"] = _csv_options(record["options"], source, line)
        if "label" in record:
            record["label"] = _csv_label(record["label"], source, line)
        yield line, record


def _csv_options(cell: str, source: str, line: int) -> Any:
    return _json_loads(cell, source, line, "options", "must be a JSON list of strings")


def _csv_label(cell: str, source: str, line: int) -> int | str:
    # Left a string when not an integer, so the shared check reports it as a wrong type.
    if not re.fullmatch(r"\s*-?\d+\s*", cell):
        return cell
    try:
        return int(cell)
    except ValueError:  # longer than Python's int/str conversion limit
        raise error(source, line, "label", f"{reprlib.repr(cell.strip())} is out of range") from None
