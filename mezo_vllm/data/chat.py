"""Chat records: a conversation rendered by the model's own chat template, split before the last turn.

The context is `apply_chat_template(messages[:-1], add_generation_prompt=True)`: the text vLLM's
`/v1/chat/completions` builds from the same messages, so an adapter is trained on exactly the
text it is served with. The target is what the template writes after that context, up to the end
of the last message's content (the end-of-turn marker after it is not scored). The rendered text
already holds the template's special tokens, a BOS included, so it is tokenized without adding
any (`Example.templated`); the split is on text, and a test checks that the tokens are those of
`apply_chat_template(messages)` cut at the length of the context's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from .types import DataError


def tokenizer_loader(model_dir: str, trust_remote_code: bool = False) -> Callable[[], Any]:
    """The model's tokenizer, loaded on the first call only: only chat data needs it before the
    engine (which has its own) starts."""

    @functools.cache
    def load() -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise DataError(f"{model_dir}: cannot load its tokenizer for the chat template "
                            f"({type(e).__name__}: {e})".splitlines()[0]) from None

    return load


def render(messages: Sequence[dict[str, str]], tokenizer: Any, where: str) -> tuple[str, str]:
    """(context, target) of a conversation whose last message is the assistant's answer."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        model = getattr(tokenizer, "name_or_path", "") or "the model"
        raise DataError(f"{where}: messages: {model} has no chat template (no chat_template in its "
                        "tokenizer_config.json, no chat_template.jinja): write prompt/completion records instead")
    try:
        context = tokenizer.apply_chat_template(list(messages[:-1]), add_generation_prompt=True, tokenize=False)
        whole = tokenizer.apply_chat_template(list(messages), tokenize=False)
    except (TemplateError, TypeError, ValueError) as e:
        cause = (str(e) or type(e).__name__).splitlines()[0]
        raise DataError(f"{where}: messages: the model's chat template refused the conversation ({cause})") from None
    if not whole.startswith(context):
        raise DataError(f"{where}: messages: the chat template renders the conversation before the last turn "
                        "(with its generation prompt) differently once the turn is added: no context to score it after")
    rest = whole[len(context):]
    content = messages[-1]["content"]
    # some templates trim the content (Llama 3's `| trim`)
    found = next((c for c in (content, content.strip()) if c and c in rest), None)
    if found is None:
        raise DataError(f"{where}: messages[{len(messages) - 1}].content: the chat template does not write "
                        "the last message's content as given: cannot tell which tokens to score")
    return context, rest[: rest.index(found) + len(found)]
