"""SuperGLUE: CB (three-way entailment) and COPA (cause/effect), with MeZO's templates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..types import CLASSIFICATION, Example
from . import Task, register
from .source import fields, hf_split, label, unexpected


def cb(row: Mapping[str, Any], task: str) -> Example:
    # SuperGLUE CB: 0 = entailment → "Yes", 1 = contradiction → "No", 2 = neutral → "Maybe".
    premise, hypothesis = fields(row, task, premise=str, hypothesis=str)
    return Example(f'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n',
                   ("Yes", "No", "Maybe"), label(row, task, 3))


def copa(row: Mapping[str, Any], task: str) -> Example:
    premise, question, *choices = fields(row, task, premise=str, question=str,
                                         choice1=str, choice2=str)
    if question not in ("cause", "effect") or not all(c.strip() for c in choices):
        raise unexpected(task, row)
    premise = premise.rstrip()
    if premise.endswith("."):
        premise = premise[:-1]

    def option(choice: str) -> str:  # MeZO: the first word lowercased, unless it is "I"
        first, *rest = choice.split(" ")
        return " " + " ".join([first if first == "I" else first.lower(), *rest])

    return Example(premise + (" because" if question == "cause" else " so"),
                   tuple(option(c) for c in choices), label(row, task, 2))


register(Task("cb", hf_split("super_glue/cb"), CLASSIFICATION, (32, 8),
              "'Suppose {premise} Can we infer that \"{hypothesis}\"? Yes, No, or Maybe?\\n'"
              " → 'Yes' | 'No' | 'Maybe'", cb, group=lambda row: row["premise"]))
register(Task("copa", hf_split("super_glue/copa"), CLASSIFICATION, (50, 10),
              "'{premise minus its final \".\"} because' (cause) or '... so' (effect)"
              " → ' {choice1}' | ' {choice2}' (first word lowercased unless 'I')", copa,
              group=lambda row: row["premise"]))
