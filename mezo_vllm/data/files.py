"""User data files: JSONL and CSV, validated record by record.

Two forms, set for the whole file by its first record (JSONL) or its header (CSV):
completion, `{"prompt": str, "completion": str}`, and classification,
`{"prompt": str, "options": [str, ...], "label": int}`. Bad data is reported as a `DataError`
whose one-line message names file, line and field, never as a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import re
import reprlib
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .types import CLASSIFICATION, COMPLETION, Dataset, Example, error

_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number",
               list: "array", dict: "object", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def load_file(path: str | Path) -> Dataset:
    """Load a JSONL (`.jsonl`, `.json`: one JSON object per line) or CSV (`.csv`) file.

    Two forms, set for the whole file by its first record (JSONL) or its header (CSV):
    completion, `{"prompt": str, "completion": str}`, and classification,
    `{"prompt": str, "options": [str, ...], "label": int}`. A CSV file has a header row with
    columns `prompt,completion` or `prompt,options,label`, where `options` is a JSON list
    string such as `["no", "yes"]`, so that both formats share one validation and options
    may be any number. Extra fields or columns are ignored; blank lines are skipped.
    An empty prompt is allowed (the text may carry everything), an empty completion or
    option is not: there would be nothing to score.
    """
    source = str(path)
    suffix = Path(path).suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise error(source, None, "file",
                     f"unknown extension {suffix or '(none)'!r}: expected .jsonl, .json or .csv")
    text = _read_text(Path(path), source)
    records = _csv_records(text, source) if suffix == ".csv" else _jsonl_records(text, source)
    kind: str | None = None
    first_line = 0
    examples: list[Example] = []
    for line, record in records:
        form = _form(record, source, line)
        if kind is None:
            kind, first_line = form, line
        elif form != kind:
            field = "options" if form == CLASSIFICATION else "completion"
            raise error(source, line, field, f"{form} record in a {kind} file "
                         f"(the form is set by the first record, line {first_line})")
        examples.append(_example(record, kind, source, line))
    if kind is None:
        raise error(source, None, "file", "no records")
    return Dataset(name=source, kind=kind, examples=tuple(examples))


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
            raise error(source, line, "record",
                         f"must be a JSON object, got {_json_type(record)}")
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
            if "prompt" not in header:
                raise error(source, line, "prompt", "missing column in the header row")
            _form(dict.fromkeys(header), source, line)  # a header without a form fails here
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


def _form(record: Mapping[str, Any], source: str, line: int) -> str:
    if "options" in record and "completion" in record:
        raise error(source, line, "options",
                     'a record has either "completion" or "options", not both')
    if "options" in record:
        return CLASSIFICATION
    if "completion" in record:
        return COMPLETION
    raise error(source, line, "completion",
                 'missing field (a record needs "completion", or "options" and "label")')


def _field(record: Mapping[str, Any], name: str, kind: type, source: str, line: int) -> Any:
    if name not in record:
        raise error(source, line, name, "missing field")
    value = record[name]
    # bool is a subclass of int, but `"label": true` is a mistake, not the index 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise error(source, line, name,
                     f"must be {_JSON_TYPES[kind]}, got {_json_type(value)} {reprlib.repr(value)}")
    if kind is str:
        _check_text(value, source, line, name)
    return value


def _check_text(value: str, source: str, line: int, name: str) -> None:
    """JSON's \\ud800 escapes give lone surrogates: no tokenizer can encode them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(source, line, name, f"lone surrogate U+{ord(value[e.start]):04X} at "
                     f"character {e.start} (not valid Unicode text)") from None


def _example(record: Mapping[str, Any], kind: str, source: str, line: int) -> Example:
    prompt = _field(record, "prompt", str, source, line)
    if kind == COMPLETION:
        completion = _field(record, "completion", str, source, line)
        if not completion:
            raise error(source, line, "completion", "empty string: nothing to score")
        return Example(prompt=prompt, targets=(completion,), label=None)
    options = _field(record, "options", list, source, line)
    for i, option in enumerate(options):
        if not isinstance(option, str):
            raise error(source, line, f"options[{i}]",
                         f"must be string, got {_json_type(option)} {reprlib.repr(option)}")
        if not option:
            raise error(source, line, f"options[{i}]", "empty string: nothing to score")
        _check_text(option, source, line, f"options[{i}]")
    if len(options) < 2:
        raise error(source, line, "options", f"needs at least 2 options, got {len(options)}")
    label = _field(record, "label", int, source, line)
    if not 0 <= label < len(options):
        raise error(source, line, "label",
                     f"{label} out of range for {len(options)} options (0..{len(options) - 1})")
    return Example(prompt=prompt, targets=tuple(options), label=label)
