"""GLUE: SST-2 (sentiment) and RTE (entailment), with MeZO's templates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..types import CLASSIFICATION, Example
from . import Task, register
from .source import fields, hf_split, label

SST2_TARGETS = (" terrible", " great")


def sst2(row: Mapping[str, Any], task: str) -> Example:
    (sentence,) = fields(row, task, sentence=str)
    return Example(f"{sentence.strip()} It was", SST2_TARGETS, label(row, task, 2))


def rte(row: Mapping[str, Any], task: str) -> Example:
    # GLUE RTE: label 0 = entailment → "Yes", 1 = not_entailment → "No".
    premise, hypothesis = fields(row, task, sentence1=str, sentence2=str)
    return Example(f'{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
                   ("Yes", "No"), label(row, task, 2))


register(Task("sst2", hf_split("glue/sst2"), CLASSIFICATION, (500, 100),
              "'{sentence} It was' → ' terrible' | ' great'", sst2))
register(Task("rte", hf_split("glue/rte"), CLASSIFICATION, (150, 50),
              "'{premise}\\nDoes this mean that \"{hypothesis}\" is true? Yes or No?\\n'"
              " → 'Yes' | 'No'", rte, group=lambda row: row["sentence1"]))
