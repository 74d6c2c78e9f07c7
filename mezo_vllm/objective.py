"""MeZO's objective and the metrics, once, in torch: the trainer, the reference's autograd,
`validate` and the examples all call these functions, so there is one loss to get right.

An engine scores *columns*: each request contributes one column per option it carries
(`Request.targets`), the summed log-prob of that option's target tokens. `Layout` says which
example and option every column belongs to and how many tokens it sums.

- classification: cross-entropy over the options' mean target-token log-probs,
  −log_softmax(scores)[label] (MeZO's `--train_as_classification`). Options compete on their mean
  per token, as MeZO scores them: a sum would favour the shorter of two sentence options
  (COPA) for its length alone; single-token options (SST-2, RTE, BoolQ) are unaffected.
- completion: mean NLL per target token, −Σ log p / Σ tokens.

The losses are float64, and differentiable when the sums are (the oracle's autograd gradient
is the gradient of exactly this loss).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data.types import CLASSIFICATION, KINDS, Example, Request


@dataclass(frozen=True)
class Layout:
    """Where each scored column of a list of requests belongs, in request order."""

    examples: tuple[int, ...]  # the examples scored, in order of first appearance
    row: torch.Tensor  # [columns] position of the column's example in `examples`
    option: torch.Tensor  # [columns] the option (index into Example.targets) it scores
    tokens: torch.Tensor  # [columns] float64: target tokens the column's log-prob sums

    @classmethod
    def of(cls, requests: Sequence[Request]) -> "Layout":
        position: dict[int, int] = {}
        row, option, tokens = [], [], []
        for r in requests:
            k = position.setdefault(r.example, len(position))
            for target in r.targets:
                row.append(k)
                option.append(target)
                tokens.append(r.n_targets)
        return cls(tuple(position), torch.tensor(row, dtype=torch.long),
                   torch.tensor(option, dtype=torch.long), torch.tensor(tokens, dtype=torch.float64))

    @property
    def columns(self) -> int:
        return len(self.row)


def _sums(sums: torch.Tensor | np.ndarray | Sequence[float], layout: Layout) -> torch.Tensor:
    sums = torch.as_tensor(sums, dtype=torch.float64)
    if sums.shape[-1] != layout.columns:
        raise ValueError(f"{sums.shape[-1]} scores for {layout.columns} scored columns: lengths differ")
    return sums


def option_scores(examples: Sequence[Example], layout: Layout, sums: torch.Tensor) -> torch.Tensor:
    """[..., examples, options]: each option's mean target-token log-prob; −inf past an
    example's last option (examples may have different numbers of options)."""
    labels = [examples[i].label for i in layout.examples]
    missing = [i for i, label in zip(layout.examples, labels) if label is None]
    if missing:
        raise ValueError(f"example {missing[0]} has no label: not a classification example")
    n_options = torch.tensor([len(examples[i].targets) for i in layout.examples])
    width = int(n_options.max())
    flat = layout.row * width + layout.option
    seen = torch.zeros(len(layout.examples) * width, dtype=torch.bool)
    seen[flat] = True
    wanted = torch.arange(width)[None, :] < n_options[:, None]
    if not torch.equal(seen.view(-1, width), wanted):
        bad = int(torch.nonzero((seen.view(-1, width) != wanted).any(1))[0])
        raise ValueError(f"example {layout.examples[bad]}: some options were not scored (or scored twice)")
    scores = sums.new_full((*sums.shape[:-1], len(layout.examples) * width), -torch.inf)
    scores[..., flat] = sums / layout.tokens
    return scores.view(*sums.shape[:-1], len(layout.examples), width)


def example_losses(examples: Sequence[Example], kind: str, requests: Sequence[Request],
                   sums: torch.Tensor | np.ndarray | Sequence[float]) -> torch.Tensor:
    """[..., examples scored]: one loss per example, in order of first appearance. `sums` has
    one entry per scored column on its last axis (leading axes: variants, say)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    layout = Layout.of(requests)
    sums = _sums(sums, layout)
    if kind == CLASSIFICATION:
        scores = option_scores(examples, layout, sums)
        labels = torch.tensor([examples[i].label for i in layout.examples])
        picked = scores.gather(-1, labels.expand(*scores.shape[:-1])[..., None])[..., 0]
        return torch.logsumexp(scores, -1) - picked
    shape = (*sums.shape[:-1], len(layout.examples))
    total = sums.new_zeros(shape).index_add(-1, layout.row, sums)
    count = layout.tokens.new_zeros(len(layout.examples)).index_add(0, layout.row, layout.tokens)
    return -total / count


def batch_loss(examples: Sequence[Example], kind: str, requests: Sequence[Request],
               sums: torch.Tensor | np.ndarray | Sequence[float]) -> torch.Tensor:
    """The loss MeZO differentiates: the mean of `example_losses` (per leading index)."""
    return example_losses(examples, kind, requests, sums).mean(-1)


def accuracy(examples: Sequence[Example], requests: Sequence[Request],
             sums: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """Fraction of scored examples whose option of highest mean token log-prob is the label."""
    if not requests:
        raise ValueError("accuracy of no examples")
    layout = Layout.of(requests)
    scores = option_scores(examples, layout, _sums(sums, layout))
    labels = torch.tensor([examples[i].label for i in layout.examples])
    return float((scores.argmax(-1) == labels).double().mean())


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
