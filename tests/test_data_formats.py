"""The text and chat forms, in-memory records, the once-per-file warnings and --eval-split; no engine."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from test_data import CharTokenizer

from mezo_vllm.config import ConfigError, TuneConfig
from mezo_vllm.data import (
    COMPLETION,
    DataError,
    Dataset,
    Example,
    Request,
    hold_out,
    load_file,
    load_records,
    save_records,
    tokenize,
)
from mezo_vllm.data.types import held_warnings, warn


def _write(tmp_path: Path, name: str, *records: object) -> Path:
    path = tmp_path / name
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return path


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]


# --------------------------------------------------------------------------- text

def test_text_records_load_as_completions_with_an_empty_prompt(tmp_path):
    jsonl = load_file(_write(tmp_path, "t.jsonl", {"text": "Once upon a time"}, {"text": "The end."}))
    assert jsonl.kind == COMPLETION
    assert jsonl.examples == (Example("", ("Once upon a time",), None), Example("", ("The end.",), None))
    csv = tmp_path / "t.csv"
    csv.write_text('text\n"Once upon a time"\nThe end.\n')
    assert load_file(csv).examples == jsonl.examples


def test_a_text_is_scored_after_its_first_token_or_from_the_bos():
    """A causal LM's loss: every token from those before it; without a BOS the first is context."""
    text = [Example("", ("abcd",), None)]
    (plain,), _ = tokenize(text, CharTokenizer(), max_len=16)
    assert plain == Request(0, 0, tuple(map(ord, "abcd")), span_start=1)
    (with_bos,), _ = tokenize(text, CharTokenizer(bos=0), max_len=16)
    assert with_bos == Request(0, 0, (0, *map(ord, "abcd")), span_start=1)


def test_a_long_text_keeps_its_start_or_is_rejected():
    text = [Example("", ("abcdefgh",), None)]
    (kept,), report = tokenize(text, CharTokenizer(), max_len=5)
    assert "".join(map(chr, kept.token_ids)) == "abcde" and kept.span_start == 1 and report.truncated == 1
    (kept,), _ = tokenize(text, CharTokenizer(bos=0), max_len=5)
    assert kept.token_ids == (0, *map(ord, "abcd"))
    requests, report = tokenize(text, CharTokenizer(), max_len=5, overflow="reject")
    assert requests == [] and report.rejected == 1


def test_a_text_of_one_token_without_bos_is_refused():
    with pytest.raises(DataError, match=r"^example 0: prompt: .*text of one token"):
        tokenize([Example("", ("a",), None)], CharTokenizer(), 8)
    with pytest.raises(DataError, match=r"^example 0: prompt: empty prompt and no BOS"):
        tokenize([Example("", ("a", "b"), 0)], CharTokenizer(), 8)  # options: no first token to share


@pytest.mark.parametrize("record, field, what", [
    ({"text": ""}, "text", "empty string"),
    ({"text": 3}, "text", "must be string, got integer"),
    ({"text": "a", "completion": "b"}, "completion", 'not both "completion" and "text"'),
])
def test_bad_text_records(tmp_path, record, field, what):
    path = _write(tmp_path, "t.jsonl", {"text": "fine"}, record)
    with pytest.raises(DataError, match=f"^{path}:2: {field}: .*{what}"):
        load_file(path)


# --------------------------------------------------------------------------- chat

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
     {"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": " Blue, mostly\n"}],
]


def _template_ids(tokenizer, messages, **kw) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "system-and-two-turns"])
def test_chat_tokens_are_the_templates_split_before_the_answer(tmp_path, tokenizer, messages):
    """The request is apply_chat_template(messages) up to the end of the answer's content, and
    its span starts where apply_chat_template(messages[:-1], add_generation_prompt=True) ends:
    the context is what /v1/chat/completions sends the model for messages[:-1]."""
    dataset = load_file(_write(tmp_path, "chat.jsonl", {"messages": messages}), lambda: tokenizer)
    (request,), _ = tokenize(dataset.examples, tokenizer, max_len=512)
    whole = _template_ids(tokenizer, messages)
    context = _template_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    assert request.span_start == len(context)
    assert list(request.token_ids) == whole[: len(request.token_ids)]
    assert tokenizer.decode(request.token_ids[request.span_start:]) == messages[-1]["content"]
    assert tokenizer.decode(whole[len(request.token_ids):]).startswith("<|im_end|>")  # not scored


def test_chat_adds_no_bos_to_the_template_even_when_the_tokenizer_adds_one(tmp_path, tokenizer):
    bos_adding = copy.deepcopy(tokenizer)
    bos_adding.add_bos_token = True
    assert bos_adding.bos_token_id is not None
    dataset = load_file(_write(tmp_path, "chat.jsonl", {"messages": CONVERSATIONS[0]}), lambda: bos_adding)
    (chat,), _ = tokenize(dataset.examples, bos_adding, max_len=512)
    assert list(chat.token_ids) == _template_ids(tokenizer, CONVERSATIONS[0])[: len(chat.token_ids)]
    (plain,), _ = tokenize([Example("Hi", (" there",), None)], bos_adding, max_len=512)
    assert plain.token_ids[0] == bos_adding.bos_token_id  # the control: plain prompts do get it


def test_a_model_without_a_chat_template_is_said_in_one_line(tmp_path, tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    path = _write(tmp_path, "chat.jsonl", {"messages": CONVERSATIONS[0]})
    with pytest.raises(DataError, match=f"^{path}:1: messages: .* has no chat template") as info:
        load_file(path, lambda: plain)
    assert "\n" not in str(info.value)


class TemplateTokenizer:
    """A stand-in with a given Jinja chat template (transformers' own rendering is not needed)."""

    def __init__(self, template: str) -> None:
        self.chat_template = template
        self.name_or_path = "stand-in"

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        import jinja2

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        env = jinja2.Environment()
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt)


_STRICT = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
           "[{{ m['role'] }}] {{ m['content'] | trim }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")


def test_a_template_that_trims_the_content_still_splits_at_the_answer(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  hello  "}]
    dataset = load_file(_write(tmp_path, "c.jsonl", {"messages": messages}), lambda: TemplateTokenizer(_STRICT))
    assert dataset.examples[0] == Example("[user] hi\n[assistant] ", ("hello",), None, templated=True)


@pytest.mark.parametrize("messages, field, what", [
    ([{"role": "user", "content": "hi"}], "messages", "at least 2 messages"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"}], "messages[1].role",
     "must be the assistant's, got 'user'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}], "messages[1].content", "empty"),
    ([{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "x"}], "messages[0].content",
     "must be string, got array"),
    ([{"content": "hi"}, {"role": "assistant", "content": "x"}], "messages[0].role", "missing field"),
    (["hi", {"role": "assistant", "content": "x"}], "messages[0]", "must be object, got string"),
    ("hi", "messages", "must be array, got string"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
     "messages", "the model's chat template refused the conversation (no system role)"),
])
def test_bad_chat_records(tmp_path, messages, field, what):
    path = _write(tmp_path, "c.jsonl", {"messages": CONVERSATIONS[0]}, {"messages": messages})
    with pytest.raises(DataError) as info:
        load_file(path, lambda: TemplateTokenizer(_STRICT))
    assert str(info.value).startswith(f"{path}:2: {field}: ") and what in str(info.value), info.value


def test_chat_is_jsonl_only_and_needs_a_tokenizer(tmp_path):
    csv = tmp_path / "c.csv"
    csv.write_text('messages\n"[]"\n')
    with pytest.raises(DataError, match=f"^{csv}:1: messages: chat records are JSONL only"):
        load_file(csv)
    path = _write(tmp_path, "c.jsonl", {"messages": CONVERSATIONS[0]})
    with pytest.raises(DataError, match=f"^{path}:1: messages: chat records need the model's chat template"):
        load_file(path)


# --------------------------------------------------------------------------- warnings

def test_glued_options_are_warned_once_per_file_with_a_count(tmp_path, capsys):
    path = _write(tmp_path, "k.jsonl",
                  {"prompt": "It was", "options": [" bad", " good"], "label": 0},  # spaced: fine
                  {"prompt": "It was", "options": ["bad", "good"], "label": 1},
                  {"prompt": "Sentiment:\n", "options": ["bad", "good"], "label": 1},  # prompt ends in \n: fine
                  {"prompt": "", "options": ["bad", "good"], "label": 1},  # nothing to glue to
                  {"prompt": "It was", "options": [" bad", "good"], "label": 1})
    load_file(path)
    (line,) = _warnings(capsys)
    assert line.startswith(f"warning: {path}:2: options[0]: 'bad' starts without a space")
    assert "'It wasbad'" in line and "write ' bad'" in line and line.endswith("(2 of 5 records)")


def test_unknown_fields_are_warned_once_with_a_suggestion(tmp_path, capsys):
    path = _write(tmp_path, "k.jsonl",
                  {"prompt": "a", "options": [" x", " y"], "label": 0},
                  {"prompt": "a", "options": [" x", " y"], "label": 0, "labels": 1},
                  {"prompt": "a", "options": [" x", " y"], "label": 0, "id": 3, "labels": 0})
    load_file(path)
    assert _warnings(capsys) == [f"warning: {path}:2: labels, id: no field of classification records "
                                 "(prompt, options, label): ignored (did you mean 'label'?) (2 of 3 records)"]
    csv = tmp_path / "c.csv"
    csv.write_text("prompt,completion,source,\na,b,web,\nc,d,book,\n")  # a trailing unnamed column is no field
    load_file(csv)
    assert _warnings(capsys) == [f"warning: {csv}:2: source: no field of completion records (prompt, completion): "
                                 "ignored (2 of 2 records)"]
    messages = [{"role": "user", "content": "hi", "name": "ann"}, {"role": "assistant", "contents": "x", "content": "x"}]
    chat = _write(tmp_path, "c.jsonl", {"messages": messages}, {"messages": CONVERSATIONS[0]},
                  {"messages": messages, "id": 1})
    load_file(chat, lambda: TemplateTokenizer(_STRICT))
    assert _warnings(capsys) == [f"warning: {chat}:1: messages[].name, messages[].contents, id: no field of chat "
                                 "records (messages, each with role and content): ignored (did you mean 'content'?) "
                                 "(2 of 3 records)"]


def test_clean_data_gives_no_warning(tmp_path, capsys):
    load_file(_write(tmp_path, "k.jsonl", {"prompt": "It was", "options": [" bad", " good"], "label": 0},
                     {"prompt": "It was\n", "options": ["bad", "good"], "label": 1}))
    assert _warnings(capsys) == []


def test_held_warnings_are_said_after_the_block_and_dropped_on_an_error(capsys):
    with held_warnings():
        warn("f.jsonl:1", "options[0]", "glued")
        assert _warnings(capsys) == []
    assert _warnings(capsys) == ["warning: f.jsonl:1: options[0]: glued"]
    with pytest.raises(DataError), held_warnings():
        warn("f.jsonl:1", "options[0]", "glued")
        raise DataError("f.jsonl:2: label: bad")
    assert _warnings(capsys) == []


# --------------------------------------------------------------------------- in-memory records

def test_records_in_memory_are_validated_naming_their_index():
    records = [{"prompt": "a", "options": (" x", " y"), "label": 0}, {"prompt": "b", "options": [" x"], "label": 0}]
    with pytest.raises(DataError, match=r"^data\[1\]: options: needs at least 2 options, got 1$"):
        load_records(records)
    with pytest.raises(DataError, match=r"^eval_data\[1\]: record: must be a dict, got str"):
        load_records([records[0], "oops"], "eval_data")
    with pytest.raises(DataError, match=r"^data\[1\]: completion: completion record in a classification list "
                                        r"\(the form is set by the first record, data\[0\]\)"):
        load_records([records[0], {"prompt": "p", "completion": "c"}])
    for given in ("train.jsonl", {"prompt": "a"}, None, []):
        with pytest.raises(DataError, match=r"^data: records: "):
            load_records(given)
    assert load_records(records[:1]) == Dataset("data", "classification", (Example("a", (" x", " y"), 0),))


def test_saved_records_load_back_as_the_same_examples(tmp_path, capsys):
    records = [{"prompt": "a", "options": (" x", " y"), "label": 1, "id": object()},  # not JSON: dropped
               {"prompt": "b", "options": [" x", " y"], "label": 0}]
    save_records(tmp_path / "data.jsonl", records)
    assert load_file(tmp_path / "data.jsonl") == Dataset(str(tmp_path / "data.jsonl"), "classification",
                                                         load_records(records).examples)
    assert [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()] == [
        {"prompt": "a", "options": [" x", " y"], "label": 1}, {"prompt": "b", "options": [" x", " y"], "label": 0}]


# --------------------------------------------------------------------------- --eval-split

def _numbered(n: int) -> Dataset:
    return Dataset("f.jsonl", COMPLETION, tuple(Example(str(i), (" x",), None) for i in range(n)))


def test_eval_split_holds_out_a_seeded_fraction_in_file_order():
    data = _numbered(50)
    train, dev = hold_out(data, 0.2, seed=0)
    assert len(dev.examples) == 10 and len(train.examples) == 40
    assert sorted(train.examples + dev.examples, key=lambda e: int(e.prompt)) == list(data.examples)
    assert [int(e.prompt) for e in dev.examples] == sorted(int(e.prompt) for e in dev.examples)
    assert hold_out(data, 0.2, seed=0) == (train, dev)
    assert hold_out(data, 0.2, seed=1)[1] != dev
    assert dev.examples != data.examples[-10:]  # drawn, not the tail
    assert len(hold_out(_numbered(3), 0.01, 0)[1].examples) == 1  # at least one
    with pytest.raises(DataError, match="leaves none to train on"):
        hold_out(_numbered(1), 0.5, 0)


@pytest.mark.parametrize("values, message", [
    (dict(task="sst2", eval_split=0.1), "--eval-data and --eval-split go with --data"),
    (dict(data="t.jsonl", eval_data="d.jsonl", eval_split=0.1), "--eval-split holds dev data out of --data"),
    (dict(data="t.jsonl", eval_split=1.0), "--eval-split must be in [0, 1), got 1.0"),
])
def test_eval_split_settings_are_checked(values, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        TuneConfig(out="run", **values).validate()


# --------------------------------------------------------------------------- the command line

def test_chat_data_through_the_command_line(tmp_path, monkeypatch):
    """Chat data passes every check with the default model (it has a chat template) and is refused
    in one line with a model whose tokenizer cannot be loaded; no engine starts either way."""
    from click.testing import CliRunner
    from test_preflight import _fake_model

    import mezo_vllm.engine
    from mezo_vllm.cli import main

    class Started(Exception):
        pass

    def no_engine(config, adapter):
        raise Started(config.model)

    monkeypatch.setattr(mezo_vllm.engine, "VllmEngine", no_engine)
    data = _write(tmp_path, "chat.jsonl", *({"messages": m} for m in CONVERSATIONS))
    result = CliRunner().invoke(main, ["tune", "--data", str(data), "--eval-split", "0.5", "--out", str(tmp_path / "a")])
    assert isinstance(result.exception, Started), result.output
    fake = _fake_model(tmp_path / "fake")
    result = CliRunner().invoke(main, ["tune", "--data", str(data), "--model", str(fake), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and result.output.startswith(
        f"error: {fake.resolve()}: cannot load its tokenizer for the chat template ("), result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_serve_tells_chat_runs_to_send_messages(tmp_path):
    from mezo_vllm.data.files import first_form
    from mezo_vllm.serve import _prompt_format

    chat = _write(tmp_path, "chat.jsonl", "\n", {"messages": CONVERSATIONS[0]})
    plain = _write(tmp_path, "plain.jsonl", {"prompt": "a", "completion": " b"})
    text = tmp_path / "t.csv"
    text.write_text(" text \nabc\n")
    assert [first_form(p) for p in (chat, plain, text, tmp_path / "gone.jsonl")] == ["chat", "completion", "text", None]
    assert _prompt_format({"data": str(chat)}).startswith("messages to /v1/chat/completions (the server applies")
    assert _prompt_format({"data": str(plain)}).startswith("raw text to /v1/completions, no chat template")
