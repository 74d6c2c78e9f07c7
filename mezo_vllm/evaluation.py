"""Dev and test metrics of a variant: accuracy, NLL, and F1/EM of greedy answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .data import CLASSIFICATION, Split
from .objective import accuracy, batch_loss, exact_match, squad_f1

# Greedy answers of generation tasks stop at a newline (the targets end with one) or after this
# many tokens; SQuAD/DROP answers are a few words.
MAX_ANSWER_TOKENS = 32


def _references(split: Split, example: int) -> tuple[str, ...]:
    """What a generated answer is scored against: the task's answers, else the completion."""
    e = split.dataset.examples[example]
    return e.answers or (e.targets[0].strip(),)


def generation_scores(engine: Any, split: Split, examples: Sequence[int],
                      variants: Sequence[int | None]) -> tuple[np.ndarray, np.ndarray]:
    """F1 and exact match [variant, example] of greedy answers, every variant in one engine call;
    the context is the request's own (already truncated) token ids, so it is what was scored."""
    contexts = [split.by_example[i][0].token_ids[: split.by_example[i][0].span_start] for i in examples]
    texts = engine.generate(contexts, MAX_ANSWER_TOKENS, list(variants))
    f1 = np.array([[squad_f1(t, _references(split, i)) for t, i in zip(row, examples)] for row in texts])
    em = np.array([[exact_match(t, _references(split, i)) for t, i in zip(row, examples)] for row in texts])
    return f1, em


def evaluate(engine: Any, split: Split, variant: int | None) -> dict[str, float]:
    """Accuracy for classification; mean per-token NLL for completion, and for question answering
    (examples with reference answers: SQuAD, DROP) F1 and exact match of greedy answers."""
    sums = engine.score(split.requests, [variant])[0]
    examples = split.dataset.examples
    if split.dataset.kind == CLASSIFICATION:
        return {"accuracy": accuracy(examples, split.requests, sums)}
    metrics = {"nll": float(batch_loss(examples, split.dataset.kind, split.requests, sums))}
    scored = sorted(split.by_example)
    if all(examples[i].answers for i in scored):
        f1, em = generation_scores(engine, split, scored, [variant])
        metrics.update(f1=float(f1.mean()), em=float(em.mean()))
    return metrics
