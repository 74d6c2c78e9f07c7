"""The data's types: examples as loaded, and the requests an engine scores."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tqdm import tqdm

CLASSIFICATION = "classification"
COMPLETION = "completion"
KINDS = (CLASSIFICATION, COMPLETION)

__all__ = ["CLASSIFICATION", "COMPLETION", "KINDS", "DataError", "Example", "Dataset", "TaskSplits",
           "Request", "error", "held_warnings", "warn"]


class DataError(Exception):
    """Bad input data; the message is one line: `<file>:<line>: <field>: <what is wrong>`."""


def error(source: str, line: int | None, field: str, what: str) -> DataError:
    where = source if line is None else f"{source}:{line}"
    return DataError(f"{where}: {field}: {what}")


_held: list[list[tuple[str, str, str]]] = []  # the warnings of each open `held_warnings` block


def warn(where: str, field: str, what: str) -> None:
    """Data that loads but probably not as meant: one line on stderr, `warning: <where>: <field>: ...`
    (through tqdm, so an open progress bar is not broken)."""
    if _held:
        _held[-1].append((where, field, what))
    else:
        tqdm.write(f"warning: {where}: {field}: {what}", file=sys.stderr)


@contextmanager
def held_warnings() -> Iterator[None]:
    """The warnings of the block, said when it ends without an error and dropped when it raises:
    a refused run shows its one error line, not warnings about data it never used."""
    _held.append([])
    try:
        yield
    except BaseException:
        _held.pop()
        raise
    for held in _held.pop():
        warn(*held)


@dataclass(frozen=True)
class Example:
    prompt: str
    targets: tuple[str, ...]  # completion form: (completion,); classification: the options
    label: int | None  # None for completion form; index into targets for classification
    # Reference answers of a question-answering example (SQuAD, DROP), for squad_f1 and
    # exact_match; empty otherwise. targets[0] is built from answers[0].
    answers: tuple[str, ...] = ()
    # The prompt is a chat template's rendering: the special tokens it needs (a BOS included)
    # are in its text already, so tokenization adds none.
    templated: bool = False


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
    """Context tokens followed by a target span, scored as the log-probs of the span's tokens.

    The span spells option `target` of the example. `alternatives` lets one request score
    several options when they differ only in their last token (every single-token verbalizer:
    SST-2's " negative"/" positive", " Yes"/" No"): each (option, token id) is scored at the
    span's last row in place of `token_ids[-1]`, so the options share one forward pass of
    the context instead of repeating it. The result of a request is a [n_targets, columns]
    matrix of log-probs, `candidates`, whose column c sums to the log-prob of option
    `targets[c]`; that is exactly the shape of vLLM V2's `prompt_logprob_token_ids`.
    """

    example: int  # index of the example in the list given to tokenize()
    target: int  # index into example.targets of the option the span spells
    token_ids: tuple[int, ...]  # context tokens + target tokens
    span_start: int  # index in token_ids of the first target token (the span runs to the end)
    alternatives: tuple[tuple[int, int], ...] = ()  # (option, its last token id)

    @property
    def n_targets(self) -> int:
        """Target tokens in the span: the rows scored, and each option's token count."""
        return len(self.token_ids) - self.span_start

    @property
    def targets(self) -> tuple[int, ...]:
        """The option of each scored column."""
        return (self.target, *(option for option, _ in self.alternatives))

    @property
    def candidates(self) -> tuple[tuple[int, ...], ...]:
        """[n_targets][columns]: the token ids whose log-prob each span row contributes to
        each column (row i predicts token span_start + i)."""
        width = 1 + len(self.alternatives)
        span = self.token_ids[self.span_start:]
        last = (span[-1], *(token for _, token in self.alternatives))
        return (*((t,) * width for t in span[:-1]), last)

    def columns(self) -> list["Request"]:
        """One plain request per column (for engines that score only the prompt's own tokens)."""
        head = self.token_ids[:-1]
        return [Request(self.example, self.target, self.token_ids, self.span_start),
                *(Request(self.example, option, (*head, token), self.span_start)
                  for option, token in self.alternatives)]
