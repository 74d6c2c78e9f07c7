"""Fuzzing `load_file`: whatever the bytes, a Dataset or a one-line DataError naming the file.

Never another exception, never a hang. Each property runs a modest number of examples under a
deadline, so the whole module stays a few seconds; the hand-written cases after the properties
cover what random generation rarely reaches (5 MB lines, 100,000-deep nesting, FIFOs).
"""

from __future__ import annotations

import contextlib

import json
import os
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mezo_vllm.data import KINDS, CLASSIFICATION, DataError, Dataset, load_file, tokenize

FUZZ = settings(max_examples=40, deadline=timedelta(seconds=3), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SUFFIXES = (".jsonl", ".json", ".csv")

# Characters that break naive text handling: NUL, BOM, RTL marks/overrides, combining marks,
# Unicode line breaks that str.splitlines() honours but JSONL does not, quotes and separators.
TRICKY = ["\x00", "\ufeff", "\u200f", "\u202e", "\u0301", "\u0338", "\u2028", "\u2029", "\x85",
          "\x0b", "\x0c", "\r", "\n", "\t", '"', ",", "\\", "{", "[", "\U0001F600", "\u00e9",
          "\ufffd", "\u061c", "\u200d",
          "\ud800", "\udfff"]  # lone surrogates: JSON escapes them (\\ud800); raw, they are bad UTF-8
tricky_text = st.lists(st.sampled_from(TRICKY) | st.characters(), max_size=30).map("".join)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | tricky_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(tricky_text, children, max_size=4),
    max_leaves=20,
)

# Invalid UTF-8 and encoding marks to splice into otherwise valid files.
BAD_BYTES = [b"\xff", b"\xfe", b"\xc3", b"\xc3\x28", b"\xed\xa0\x80",  # encoded surrogate U+D800
             b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80", b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff",
             b"\x00", b"\r\n", b"\n", b'"', b","]


def _load(content: bytes, suffix: str) -> Dataset | DataError:
    """Write `content` to a fresh file and load it; assert the contract; return what came back."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(content)
        try:
            dataset = load_file(path)
        except DataError as e:
            message = str(e)
            assert message.startswith(f"{path}:"), message
            assert len(message.splitlines()) == 1, message
            return e
    assert isinstance(dataset, Dataset)
    assert dataset.kind in KINDS and dataset.examples
    for ex in dataset.examples:
        assert isinstance(ex.prompt, str) and ex.targets
        for text in (ex.prompt, *ex.targets):
            text.encode("utf-8")  # no lone surrogates: a tokenizer can take every string
        assert all(isinstance(t, str) and t for t in ex.targets)
        if dataset.kind == CLASSIFICATION:
            assert len(ex.targets) >= 2 and type(ex.label) is int and 0 <= ex.label < len(ex.targets)
        else:
            assert len(ex.targets) == 1 and ex.label is None
    return dataset


def _utf8(text: str) -> bytes:
    """UTF-8, with lone surrogates written as the (invalid) bytes a careless encoder makes."""
    return text.encode("utf-8", "surrogatepass")


def _csv_cell(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return '"' + text.replace('"', '""') + '"'


# --------------------------------------------------------------------------- properties


@FUZZ
@given(content=st.binary(max_size=400), suffix=st.sampled_from(SUFFIXES))
def test_arbitrary_bytes(content, suffix):
    _load(content, suffix)


@FUZZ
@given(lines=st.lists(json_values, min_size=0, max_size=6), suffix=st.sampled_from((".jsonl", ".json")))
def test_arbitrary_json_value_per_line(lines, suffix):
    _load("".join(json.dumps(v) + "\n" for v in lines).encode(), suffix)


good_completion = st.fixed_dictionaries({"prompt": tricky_text, "completion": tricky_text})
good_classification = st.integers(2, 4).flatmap(lambda n: st.fixed_dictionaries({
    "prompt": tricky_text,
    "options": st.lists(tricky_text.filter(bool), min_size=n, max_size=n),
    "label": st.integers(0, n - 1),
}))


def _spoil(record: dict, data: st.DataObject) -> dict:
    """Replace some values by arbitrary JSON values, and maybe drop or add a key."""
    out = dict(record)
    for key in data.draw(st.lists(st.sampled_from(sorted(record)), unique=True, max_size=len(record))):
        out[key] = data.draw(json_values)
    if data.draw(st.booleans()):
        out.pop(data.draw(st.sampled_from(sorted(out))), None)
    if data.draw(st.booleans()):
        out[data.draw(st.sampled_from(["completion", "options", "label", "prompt"]))] = data.draw(json_values)
    return out


@FUZZ
@given(data=st.data(), n=st.integers(1, 4))
def test_right_keys_wrong_types_jsonl(data, n):
    records = [_spoil(data.draw(good_completion | good_classification), data) for _ in range(n)]
    _load("".join(json.dumps(r) + "\n" for r in records).encode(), ".jsonl")


@FUZZ
@given(data=st.data(), n=st.integers(1, 4))
def test_right_keys_wrong_types_csv(data, n):
    classification = data.draw(st.booleans())
    header = ["prompt", "options", "label"] if classification else ["prompt", "completion"]
    good = good_classification if classification else good_completion
    rows = []
    for _ in range(n):
        record = _spoil(data.draw(good), data)
        rows.append(",".join(_csv_cell(record.get(k, "")) for k in header))
    _load(_utf8("\n".join([",".join(header), *rows]) + "\n"), ".csv")


@FUZZ
@given(records=st.lists(good_completion | good_classification, min_size=1, max_size=4),
       splices=st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(BAD_BYTES)), max_size=3),
       suffix=st.sampled_from((".jsonl", ".csv")))
def test_valid_files_with_bad_bytes_spliced_in(records, splices, suffix):
    if suffix == ".csv":
        keys = list(records[0])
        text = ",".join(keys) + "\n" + "".join(
            ",".join(_csv_cell(r.get(k, "")) for k in keys) + "\n" for r in records)
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    content = _utf8(text)
    for at, bad in splices:
        at %= len(content) + 1
        content = content[:at] + bad + content[at:]
    _load(content, suffix)


@FUZZ
@given(records=st.lists(good_completion | good_classification, min_size=1, max_size=4),
       bom=st.sampled_from([b"", b"\xef\xbb\xbf", b"\xef\xbb\xbf\xef\xbb\xbf"]))
def test_well_typed_unicode_records_load_and_tokenize(records, bom, tokenizer):
    """Records of the right shape with tricky text: JSONL always loads (ensure_ascii=False keeps the
    characters raw), and what loads tokenizes (or is refused with a DataError), never a crash."""
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if any("\ud800" <= c <= "\udfff" for c in raw):  # lone surrogates travel as \\uXXXX escapes
        raw = "".join(json.dumps(r) + "\n" for r in records)
    content = bom + raw.encode()
    result = _load(content, ".jsonl")
    if isinstance(result, DataError):
        # only refusals of content: a mixed file, an empty completion, a double BOM, ...
        assert any(w in str(result) for w in ("record in a", "empty string", "malformed JSON",
                                                 "lone surrogate")), result
        return
    with contextlib.suppress(DataError):  # tokenizing either works or says why in one line
        tokenize(result.examples, tokenizer, 64)


# --------------------------------------------------------------------------- hand-written cases

SLOW = 10.0  # seconds: a generous bound for "did not hang" on a loaded 2-core machine


def _timed_load(tmp_path: Path, name: str, content: bytes) -> Dataset | DataError:
    path = tmp_path / name
    path.write_bytes(content)
    t0 = time.perf_counter()
    try:
        result: Dataset | DataError = load_file(path)
    except DataError as e:
        assert str(e).startswith(f"{path}:") and len(str(e).splitlines()) == 1, e
        result = e
    assert time.perf_counter() - t0 < SLOW
    return result


def test_five_megabyte_line(tmp_path):
    big = "x" * 5_000_000
    ds = _timed_load(tmp_path, "big.jsonl", json.dumps({"prompt": big, "completion": "y"}).encode() + b"\n")
    assert isinstance(ds, Dataset) and ds.examples[0].prompt == big
    # CSV: the csv module's default cap of 131,072 characters per cell does not apply
    result = _timed_load(tmp_path, "big.csv", f"prompt,completion\n{big},y\n".encode())
    assert isinstance(result, Dataset) and result.examples[0].prompt == big


def test_five_megabyte_line_of_garbage(tmp_path):
    result = _timed_load(tmp_path, "junk.jsonl", b"{" + b"\x01" * 5_000_000 + b"\n")
    assert isinstance(result, DataError) and ":1: record: malformed JSON" in str(result)


@pytest.mark.parametrize("name, content, expected", [
    ("deep.jsonl", b"[" * 100_000 + b"\n", ":1: record: malformed JSON (nested too deeply)"),
    ("deep2.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": ' + b'{"a":' * 100_000 + b"\n",
     ":2: record: malformed JSON (nested too deeply)"),
    ("deep.csv", b'prompt,options,label\na,"' + b"[" * 100_000 + b'",0\n',
     ":2: options: must be a JSON list of strings (nested too deeply)"),
    # nested deeply but within the decoder's reach: a wrong type, reported with a short repr
    ("deepish.jsonl", b'{"prompt": ' + b"[" * 500 + b"]" * 500 + b', "completion": "b"}\n',
     ":1: prompt: must be string, got array [[[[[[[...]]]]]]]"),
])
def test_deeply_nested_json(tmp_path, name, content, expected):
    result = _timed_load(tmp_path, name, content)
    assert isinstance(result, DataError) and expected in str(result), result


@pytest.mark.parametrize("name, content, expected", [
    ("n.jsonl", b'{"prompt": "a", "options": ["x", "y"], "label": ' + b"9" * 5000 + b"}\n",
     ":1: record: malformed JSON (a number has more than 4300 digits)"),
    ("n.csv", b'prompt,options,label\na,"[""x"",""y""]",' + b"9" * 5000 + b"\n", ":2: label: '999"),
    ("o.csv", b'prompt,options,label\na,"[' + b"9" * 5000 + b']",0\n',
     ":2: options: must be a JSON list of strings (a number has more than 4300 digits)"),
    ("big.jsonl", b'{"prompt": "a", "options": ["x", "y"], "label": ' + b"9" * 4000 + b"}\n",
     ":1: label: 999"),  # parsed, then out of range
])
def test_integers_beyond_pythons_str_conversion_limit(tmp_path, name, content, expected):
    result = _timed_load(tmp_path, name, content)
    assert isinstance(result, DataError) and expected in str(result), result


@pytest.mark.parametrize("field, record", [
    ("prompt", {"prompt": "\ud800", "completion": "b"}),
    ("completion", {"prompt": "a", "completion": "x\udfff"}),
    ("options[1]", {"prompt": "a", "options": ["x", "\udc80"], "label": 0}),
])
def test_lone_surrogate_escapes_are_refused(tmp_path, field, record):
    """json.loads accepts "\\ud800", but no tokenizer can encode it (TypeError deep in tokenizers)."""
    result = _timed_load(tmp_path, "s.jsonl", json.dumps(record).encode() + b"\n")
    assert isinstance(result, DataError) and f":1: {field}: lone surrogate U+" in str(result), result


def test_paired_surrogate_escapes_are_one_character(tmp_path):
    ds = _timed_load(tmp_path, "p.jsonl", b'{"prompt": "\\ud83d\\ude00", "completion": "b"}\n')
    assert isinstance(ds, Dataset) and ds.examples[0].prompt == "\U0001F600"


@pytest.mark.parametrize("name, content, expected", [
    ("u.jsonl", b'{"prompt": "a\xff", "completion": "b"}\n', ":1: file: not UTF-8 (byte 0xff)"),
    ("u2.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xed\xa0\x80", "completion": "b"}\n',
     ":2: file: not UTF-8 (byte 0xed)"),
    ("u16.jsonl", '{"prompt": "a", "completion": "b"}\n'.encode("utf-16"), ":1: file: not UTF-8"),
    ("u.csv", b"prompt,completion\na,\xc3\n", ":2: file: not UTF-8 (byte 0xc3)"),
    ("nul.jsonl", b'{"prompt": "a\x00", "completion": "b"}\n', ":1: record: malformed JSON (Invalid control"),
])
def test_encoding_faults(tmp_path, name, content, expected):
    result = _timed_load(tmp_path, name, content)
    assert isinstance(result, DataError) and expected in str(result), result


def test_nul_rtl_and_combining_characters_are_text(tmp_path):
    text = "a\x00b\u202e\u200fc\u0301\u0338"
    ds = _timed_load(tmp_path, "t.csv", f"\ufeffprompt,completion\n{text},x\n".encode())
    assert isinstance(ds, Dataset) and ds.examples[0].prompt == text
    ds = _timed_load(tmp_path, "t.jsonl", json.dumps({"prompt": text, "completion": "\u2028"}).encode() + b"\n")
    assert isinstance(ds, Dataset) and ds.examples[0].targets == ("\u2028",)


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    outcome: list[BaseException | Dataset] = []

    def load() -> None:
        try:
            outcome.append(load_file(fifo))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            outcome.append(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # release the blocked reader before failing
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(5)
        pytest.fail("load_file blocked on a FIFO")
    assert isinstance(outcome[0], DataError) and "file: not a regular file" in str(outcome[0])
