"""Records (the lines of a data file, or the dicts given to `tune`) validated into examples.

Four forms; the first record sets the form of the whole file or list:

| form | record | loss |
|---|---|---|
| completion | `{"prompt": str, "completion": str}` | the completion's tokens, after the prompt |
| classification | `{"prompt": str, "options": [str, ...], "label": int}` | cross-entropy over the options |
| text | `{"text": str}` | every token of the text predicted from those before it (a causal LM's loss): all but the first, or all when the tokenizer puts a BOS in front |
| chat | `{"messages": [{"role": str, "content": str}, ...]}` | the last message (the assistant's) content, after the conversation before it as the model's chat template renders it (`chat.py`) |

A text is a completion with an empty prompt (`tokenize` scores it as above and, when it is too
long, keeps its start). Bad data is a `DataError` whose one line names the record (`file:line`,
or `data[index]` for a list), the field and what is wrong. Data that loads but is probably not
what was meant gives one warning line per kind of mistake and file, at its first record with a
count, not one per record: an option glued to its prompt, fields no form has (they are ignored).
"""

from __future__ import annotations

import difflib
import reprlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import chat
from .types import CLASSIFICATION, COMPLETION, DataError, Dataset, Example, warn

TEXT, CHAT = "text", "chat"
# The field that tells a record's form; a record with two of them is refused naming the first.
_FORM_FIELDS = {"options": CLASSIFICATION, "completion": COMPLETION, "text": TEXT, "messages": CHAT}
_TELLS = {form: name for name, form in _FORM_FIELDS.items()}
FIELDS = {COMPLETION: ("prompt", "completion"), CLASSIFICATION: ("prompt", "options", "label"),
          TEXT: ("text",), CHAT: ("messages",)}
KIND = {COMPLETION: COMPLETION, CLASSIFICATION: CLASSIFICATION, TEXT: COMPLETION, CHAT: COMPLETION}
_MESSAGE_FIELDS = ("role", "content")

_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number",
               list: "array", dict: "object", type(None): "null"}


def json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def bad(where: str, field: str, what: str) -> DataError:
    return DataError(f"{where}: {field}: {what}")


def form_of(record: Mapping[str, Any], where: str) -> str:
    found = [name for name in _FORM_FIELDS if name in record]
    if len(found) > 1:
        raise bad(where, found[0], f'a record has one of "options", "completion", "text" or "messages", '
                  f'not both "{found[0]}" and "{found[1]}"')
    if not found:
        raise bad(where, "completion", 'missing field (a record needs "completion", "options" and "label", '
                  '"text", or "messages")')
    return _FORM_FIELDS[found[0]]


@dataclass
class _Notes:
    """The warnings of one file or list: each kind said once, at its first record, with a count."""

    records: int = 0
    first: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # kind → where, field, what
    count: Counter = field(default_factory=Counter)
    unknown: dict[str, None] = field(default_factory=dict)  # unknown field names, in order of appearance
    unknown_in: list[str] = field(default_factory=list)  # the records that have some

    def note(self, kind: str, where: str, field_: str, what: str) -> None:
        self.count[kind] += 1
        self.first.setdefault(kind, (where, field_, what))

    def note_unknown(self, names: list[str], where: str) -> None:
        self.unknown.update(dict.fromkeys(names))
        if not self.unknown_in or self.unknown_in[-1] != where:
            self.unknown_in.append(where)

    def say(self, form: str) -> None:
        if self.unknown:
            fields_ = ", ".join(FIELDS[form]) + (", each with role and content" if form == CHAT else "")
            warn(self.unknown_in[0], ", ".join(self.unknown), f"no field of {form} records ({fields_}): "
                 f"ignored{_did_you_mean(self.unknown)} ({len(self.unknown_in)} of {self.records} records)")
        for kind, (where, field_, what) in self.first.items():
            warn(where, field_, f"{what} ({self.count[kind]} of {self.records} records)")


def _did_you_mean(unknown: Iterable[str]) -> str:
    """The known field nearest to the first unknown one that is near any (`labels` → `label`)."""
    record_fields = {name for names in FIELDS.values() for name in names}
    for name in unknown:
        bare = name.removeprefix("messages[].")
        close = difflib.get_close_matches(bare, _MESSAGE_FIELDS if bare != name else record_fields, n=1)
        if close:
            return f" (did you mean {close[0]!r}?)"
    return ""


def to_dataset(records: Iterable[tuple[str, Mapping[str, Any]]], name: str, unit: str = "file",
               chat_tokenizer: Callable[[], Any] | None = None) -> Dataset | None:
    """The examples of `(where, record)` pairs, in order; None when there are none. `unit` is
    what holds them, for messages ("file", "list"); `chat_tokenizer` gives the tokenizer whose
    chat template renders chat records (called only if there are some)."""
    form: str | None = None
    first = ""
    notes = _Notes()
    examples: list[Example] = []
    for where, record in records:
        this = form_of(record, where)
        if form is None:
            form, first = this, where
        elif this != form:
            raise bad(where, _TELLS[this], f"{this} record in a {form} {unit} "
                      f"(the form is set by the first record, {first})")
        notes.records += 1
        unknown = [str(k) for k in record if k not in FIELDS[form] and str(k).strip()]  # CSV: unnamed columns
        if unknown:
            notes.note_unknown(unknown, where)
        examples.append(_example(form, record, where, notes, chat_tokenizer))
    if form is None:
        return None
    notes.say(form)
    return Dataset(name=name, kind=KIND[form], examples=tuple(examples))


def load_records(records: Any, name: str = "data", chat_tokenizer: Callable[[], Any] | None = None) -> Dataset:
    """A list of records in memory (the dicts a data file's lines hold), validated as a file is;
    errors name the record by its index, `data[3]: label: ...`."""
    if not isinstance(records, (list, tuple)):
        raise bad(name, "records", f"must be a list of records (dicts), got {type(records).__name__}")

    def located() -> Iterable[tuple[str, Mapping[str, Any]]]:
        for i, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise bad(f"{name}[{i}]", "record", f"must be a dict, got {type(record).__name__} "
                          f"{reprlib.repr(record)}")
            yield f"{name}[{i}]", record

    dataset = to_dataset(located(), name, "list", chat_tokenizer)
    if dataset is None:
        raise bad(name, "records", "empty list: no examples")
    return dataset


def stored(record: Mapping[str, Any]) -> dict[str, Any]:
    """A valid record as a data file keeps it: its form's fields only (those that train)."""
    form = form_of(record, "")
    kept = {name: record[name] for name in FIELDS[form] if name in record}
    if form == CHAT:
        kept["messages"] = [{k: m[k] for k in _MESSAGE_FIELDS} for m in record["messages"]]
    if form == CLASSIFICATION:
        kept["options"] = list(record["options"])
    return kept


def _field(record: Mapping[str, Any], name: str, kind: type, where: str, shown: str | None = None) -> Any:
    shown = shown or name
    if name not in record:
        raise bad(where, shown, "missing field")
    value = record[name]
    accepted = (list, tuple) if kind is list else kind  # a tuple: a list given in Python
    # bool is a subclass of int, but `"label": true` is a mistake, not the index 1.
    if not isinstance(value, accepted) or (kind is int and isinstance(value, bool)):
        raise bad(where, shown, f"must be {_JSON_TYPES[kind]}, got {json_type(value)} {reprlib.repr(value)}")
    if kind is str:
        _check_text(value, where, shown)
    return value


def _check_text(value: str, where: str, name: str) -> None:
    """JSON's \\ud800 escapes give lone surrogates: no tokenizer can encode them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(where, name, f"lone surrogate U+{ord(value[e.start]):04X} at "
                  f"character {e.start} (not valid Unicode text)") from None


def _scored(value: str, where: str, name: str) -> str:
    """A text that is scored: an empty one would leave nothing to score."""
    if not value:
        raise bad(where, name, "empty string: nothing to score")
    return value


def _example(form: str, record: Mapping[str, Any], where: str, notes: _Notes,
             chat_tokenizer: Callable[[], Any] | None) -> Example:
    if form == TEXT:
        return Example(prompt="", targets=(_scored(_field(record, "text", str, where), where, "text"),), label=None)
    if form == CHAT:
        if chat_tokenizer is None:
            raise bad(where, "messages", "chat records need the model's chat template, and no tokenizer was given")
        context, target = chat.render(_messages(record, where, notes), chat_tokenizer(), where)
        return Example(prompt=context, targets=(target,), label=None, templated=True)
    prompt = _field(record, "prompt", str, where)
    if form == COMPLETION:
        completion = _scored(_field(record, "completion", str, where), where, "completion")
        return Example(prompt=prompt, targets=(completion,), label=None)
    options = _field(record, "options", list, where)
    for i, option in enumerate(options):
        if not isinstance(option, str):
            raise bad(where, f"options[{i}]", f"must be string, got {json_type(option)} {reprlib.repr(option)}")
        _check_text(_scored(option, where, f"options[{i}]"), where, f"options[{i}]")
    if len(options) < 2:
        raise bad(where, "options", f"needs at least 2 options, got {len(options)}")
    label = _field(record, "label", int, where)
    if not 0 <= label < len(options):
        raise bad(where, "label", f"{label} out of range for {len(options)} options (0..{len(options) - 1})")
    glued = next((i for i, o in enumerate(options) if not o[0].isspace()), None)
    if prompt and not prompt[-1].isspace() and glued is not None:
        option = options[glued]
        notes.note("glued", where, f"options[{glued}]",
                   f"{option!r} starts without a space and the prompt does not end in one, so it is scored "
                   f"joined to the prompt ({reprlib.repr(prompt[-15:] + option)}); write {' ' + option!r} "
                   "if a space is meant")
    return Example(prompt=prompt, targets=tuple(options), label=label)


def _messages(record: Mapping[str, Any], where: str, notes: _Notes) -> list[dict[str, str]]:
    messages = _field(record, "messages", list, where)
    if len(messages) < 2:
        raise bad(where, "messages", f"needs at least 2 messages (the conversation, then the assistant's "
                  f"answer that is scored), got {len(messages)}")
    checked = []
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise bad(where, at, f"must be object, got {json_type(message)} {reprlib.repr(message)}")
        role = _field(message, "role", str, where, f"{at}.role")
        content = _field(message, "content", str, where, f"{at}.content")
        unknown = [f"messages[].{k}" for k in message if k not in _MESSAGE_FIELDS]
        if unknown:
            notes.note_unknown(unknown, where)
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != "assistant":
        raise bad(where, f"messages[{len(checked) - 1}].role", "the last message is the answer that is scored: "
                  f"it must be the assistant's, got {checked[-1]['role']!r}")
    _scored(checked[-1]["content"], where, f"messages[{len(checked) - 1}].content")
    return checked
