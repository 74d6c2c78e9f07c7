"""GLUE: SST-2 (sentiment) and RTE (entailment).

RTE keeps MeZO's template. SST-2's is the one of `examples/study.py templates` with the best
zero-shot accuracy of the embedded SmolLM2-135M-Instruct on the train and dev splits (78% where
MeZO's " It was terrible/great", written for OPT, gives 51%: the model answers " great" to 99% of
the reviews); MeZO's stays as the task `sst2-mezo`, to compare with MeZO's figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..types import CLASSIFICATION, Example
from . import Task, register
from .source import fields, hf_split, label

SST2_TARGETS = (" negative", " positive")
SST2_MEZO_TARGETS = (" terrible", " great")


def sst2(row: Mapping[str, Any], task: str) -> Example:
    (sentence,) = fields(row, task, sentence=str)
    return Example(f"Movie review: {sentence.strip()}\nSentiment:", SST2_TARGETS, label(row, task, 2))


def sst2_mezo(row: Mapping[str, Any], task: str) -> Example:
    (sentence,) = fields(row, task, sentence=str)
    return Example(f"{sentence.strip()} It was", SST2_MEZO_TARGETS, label(row, task, 2))


def rte(row: Mapping[str, Any], task: str) -> Example:
    # GLUE RTE: label 0 = entailment → "Yes", 1 = not_entailment → "No".
    premise, hypothesis = fields(row, task, sentence1=str, sentence2=str)
    return Example(f'{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
                   ("Yes", "No"), label(row, task, 2))


register(Task("sst2", hf_split("glue/sst2"), CLASSIFICATION, (500, 100),
              "'Movie review: {sentence}\\nSentiment:' → ' negative' | ' positive'", sst2))
register(Task("sst2-mezo", hf_split("glue/sst2"), CLASSIFICATION, (500, 100),
              "'{sentence} It was' → ' terrible' | ' great' (MeZO's template)", sst2_mezo))
register(Task("rte", hf_split("glue/rte"), CLASSIFICATION, (150, 50),
              "'{premise}\\nDoes this mean that \"{hypothesis}\" is true? Yes or No?\\n'"
              " → 'Yes' | 'No'", rte, group=lambda row: row["sentence1"]))
