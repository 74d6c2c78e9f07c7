"""What an adapter is trained on is what vLLM serves it: the context tokens of chat records are the
prompt vLLM's chat path (`LLM.chat`, the renderer `/v1/chat/completions` uses) builds for the
conversation before the answer, and those of prompt records (the built-in tasks) are the prompt
its completion path (`LLM.generate` with text, as `/v1/completions`) builds. On the shared engine."""

from __future__ import annotations

import json

from vllm import SamplingParams

from mezo_vllm.data import Split, load_file, load_task

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Colour of the sky?"},
     {"role": "assistant", "content": "Blue"}],
]
ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0.0)


def test_chat_contexts_are_the_prompts_vllms_chat_endpoint_builds(tmp_path, engine_fp32):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    split = Split.make(load_file(path, lambda: engine_fp32.tokenizer), engine_fp32.tokenizer, 512, "truncate")
    served = engine_fp32.llm.chat([m[:-1] for m in CONVERSATIONS], ONE_TOKEN, use_tqdm=False)
    assert [list(o.prompt_token_ids) for o in served] == [list(r.token_ids[: r.span_start]) for r in split.requests]


def test_task_contexts_are_the_prompts_vllms_completion_endpoint_builds(engine_fp32):
    dev = load_task("sst2").dev
    split = Split.make(dev, engine_fp32.tokenizer, 512, "truncate").first(4)
    prompts = [dev.examples[r.example].prompt for r in split.requests]
    served = engine_fp32.llm.generate(prompts, ONE_TOKEN, use_tqdm=False)
    assert [list(o.prompt_token_ids) for o in served] == [list(r.token_ids[: r.span_start]) for r in split.requests]
