"""Tokenization of examples into the requests an engine scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from .types import DataError, Dataset, Example, Request, error

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TokenizeReport:
    truncated: int  # examples whose context was cut from the left
    rejected: int  # examples dropped (their indices are not in the requests)


def option_groups(targets: Sequence[Sequence[int]]) -> list[list[int]]:
    """Options that one request can score together: equal length and equal tokens but the
    last, so every span row has the same context for all of them. In order of first option."""
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for j, ids in enumerate(targets):
        groups.setdefault((len(ids), tuple(ids[:-1])), []).append(j)
    return list(groups.values())


def leading_bos(tokenizer: Any) -> list[int]:
    """The BOS the tokenizer puts in front of a text, as the one id or none. Asked of the tokenizer
    itself: transformers 5 adds it in the tokenizer's post-processor, and `add_bos_token` may say
    False while a BOS is added (Gemma's tokenizer), which would leave a model that needs its BOS
    scoring near chance, and out of step with what a server sends it."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer(["a"])["input_ids"][0][:1] == [bos] else []


def tokenize(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    overflow: str = "truncate",
    merge_options: bool = True,
) -> tuple[list[Request], TokenizeReport]:
    """Requests for each example: prompt ids + target ids, tokenized separately.

    Separate tokenization (as in MeZO) makes the option boundary exact: joint tokenization
    could merge the last prompt token with the first option token. The BOS token, when the
    tokenizer adds one, goes in front of the prompt, unless the prompt is a chat template's
    rendering (`Example.templated`), which holds its special tokens already. Options that
    differ only in their last token share one request (`Request.alternatives`; all
    single-token options do), unless `merge_options` is False; others get a request each, and
    share their context through the engine's prefix cache. An example longer than `max_len`
    is, with `overflow="truncate"`, cut from the left of its context (after the BOS), by the
    same amount for all its options so they are compared on the same context; it is dropped
    when its longest target leaves no context token, since the first target token must be
    predicted from something. With `overflow="reject"` it is dropped whole.

    A completion with an empty prompt is a text (the `text` form): every token is predicted
    from the ones before it, as in a causal LM's loss, so with no BOS in front its first
    token is the context and is not scored; a text too long keeps its first `max_len` tokens.
    """
    if overflow not in ("truncate", "reject"):
        raise ValueError(f"overflow must be 'truncate' or 'reject', got {overflow!r}")
    if not examples:
        return [], TokenizeReport(truncated=0, rejected=0)
    bos = leading_bos(tokenizer)
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    texts = list(dict.fromkeys(t for e in examples for t in e.targets))
    target_ids = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"]))
    requests: list[Request] = []
    truncated = rejected = 0
    for i, (example, prompt) in enumerate(zip(examples, prompts)):
        targets = [list(target_ids[t]) for t in example.targets]
        for j, ids in enumerate(targets):
            if not ids:
                raise error(f"example {i}", None, f"targets[{j}]",
                            f"{example.targets[j]!r} tokenizes to no tokens")
        head = [] if example.templated else bos
        text = not example.prompt and len(targets) == 1
        keep = max_len - len(head)  # a text's tokens that fit: its start is kept, as it is read in order
        if text and overflow == "truncate" and len(targets[0]) > keep >= (1 if head else 2):
            targets[0] = targets[0][:keep]
            truncated += 1
        if not head and not prompt:
            if not text:
                raise error(f"example {i}", None, "prompt", "empty prompt and no BOS token: "
                            "the first target token has nothing to be predicted from")
            if len(targets[0]) < 2:
                raise error(f"example {i}", None, "prompt", "empty prompt and no BOS token, and a text of "
                            "one token: nothing is left to score after the first token")
            prompt, targets = targets[0][:1], [targets[0][1:]]
        room = max_len - max(len(ids) for ids in targets)  # context tokens that fit
        if len(head) + len(prompt) > room:
            if overflow == "reject" or room < 1:
                rejected += 1
                continue
            keep = max(room - len(head), 0)
            prompt = prompt[len(prompt) - keep:]
            truncated += 1
        context = head + list(prompt)
        groups = option_groups(targets) if merge_options else [[j] for j in range(len(targets))]
        for first, *others in groups:
            requests.append(Request(example=i, target=first, token_ids=tuple(context + targets[first]),
                                    span_start=len(context),
                                    alternatives=tuple((j, targets[j][-1]) for j in others)))
    return requests, TokenizeReport(truncated=truncated, rejected=rejected)


@dataclass
class Split:
    """A dataset with its requests, tokenized once for the whole run."""

    dataset: Dataset
    requests: list[Request]
    by_example: dict[int, list[Request]]

    @classmethod
    def make(cls, dataset: Dataset, tokenizer: Any, max_len: int, overflow: str) -> "Split":
        requests, report = tokenize(dataset.examples, tokenizer, max_len, overflow)
        if report.truncated or report.rejected:
            tqdm.write(f"{dataset.name}: {report.truncated} examples truncated (a context from the left, a text "
                       f"at its end), {report.rejected} rejected (longer than {max_len} tokens)")
        by_example: dict[int, list[Request]] = {}
        for r in requests:
            by_example.setdefault(r.example, []).append(r)
        if not by_example:
            raise DataError(f"{dataset.name}: no example fits in {max_len} tokens")
        return cls(dataset, requests, by_example)

    def requests_of(self, examples: Sequence[int]) -> list[Request]:
        return [r for i in examples for r in self.by_example[i]]

    def first(self, n: int) -> "Split":
        """The split's first n examples (evaluating on part of a dev split)."""
        keep = sorted(self.by_example)[:n]
        return Split(self.dataset, self.requests_of(keep), {i: self.by_example[i] for i in keep})
