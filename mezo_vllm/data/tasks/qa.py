"""Extractive and numeric question answering: SQuAD v1.1 and DROP (oe-eval's 1,000 each).

The examples keep their reference answers in `Example.answers`, for `objective.squad_f1` and
`exact_match` of greedy answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..types import COMPLETION, Example
from . import Task, register
from .source import fields, oe_requests, unexpected


def answer_example(prompt: str, answers: Sequence[str]) -> Example:
    # MeZO's target is the first answer and the newline that ends it (its verbalizer's
    # "Answer: {answer}\n"), so that a tuned model also learns where to stop.
    return Example(prompt, (f" {answers[0]}\n",), None, answers=tuple(answers))


def squad(doc: Mapping[str, Any], task: str) -> Example:
    # The file keeps SQuAD's context and question only inside OLMES's query
    # "Title: {title}\nBackground: {context}\nQuestion: {question}\nAnswer:"; MeZO's
    # template names the context "Context:".
    title, query, answers = fields(doc, task, title=str, query=str, answers_text=list)
    head, tail = f"Title: {title}\nBackground: ", "\nAnswer:"
    context, found, question = query[len(head):-len(tail)].rpartition("\nQuestion: ")
    if (not (query.startswith(head) and query.endswith(tail) and found) or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)):
        raise unexpected(task, doc)
    return answer_example(f"Title: {title}\nContext: {context}\nQuestion: {question.strip()}\nAnswer:",
                          answers)


def drop(doc: Mapping[str, Any], task: str) -> Example:
    # answers: the alternative answers, each a list of spans (several for a multi-span
    # answer, joined here by ", ").
    passage, question, answers = fields(doc, task, passage=str, question=str, answers=list)
    if not answers or not all(isinstance(a, list) and a and all(isinstance(s, str) and s.strip()
                                                                  for s in a) for a in answers):
        raise unexpected(task, doc)
    return answer_example(f"Passage: {passage}\nQuestion: {question.strip()}\nAnswer:",
                          [", ".join(spans) for spans in answers])


register(Task("squad", oe_requests("squad"), COMPLETION, (500, 100),
              "'Title: {title}\\nContext: {context}\\nQuestion: {question}\\nAnswer:'"
              " → ' {first answer}\\n'", squad,
              group=lambda doc: doc["query"].rpartition("\nQuestion: ")[0]))
register(Task("drop", oe_requests("drop"), COMPLETION, (500, 100),
              "'Passage: {passage}\\nQuestion: {question}\\nAnswer:' → ' {first answer}\\n'",
              drop, group=lambda doc: doc["passage"]))
