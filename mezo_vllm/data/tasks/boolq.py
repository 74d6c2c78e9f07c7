"""BoolQ: yes/no questions about a passage, with MeZO's template."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..types import CLASSIFICATION, Example
from . import Task, register
from .source import fields, hf_split, unexpected


def boolq(row: Mapping[str, Any], task: str) -> Example:
    passage, question, answer = fields(row, task, passage=str, question=str, answer=bool)
    if not question:
        raise unexpected(task, row)
    question = question if question.endswith("?") else question + "?"
    return Example(f"{passage} {question[0].upper()}{question[1:]}", (" No", " Yes"), int(answer))


register(Task("boolq", hf_split("boolq/none"), CLASSIFICATION, (1000, 500),
              "'{passage} {Question}?' (first letter capitalised, '?' added) → ' No' | ' Yes'",
              boolq, group=lambda row: row["passage"]))
