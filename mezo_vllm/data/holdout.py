"""`--eval-split`: dev data held out of the training file, for data that comes without any."""

from __future__ import annotations

import random

from .types import Dataset, error


def hold_out(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, dev): `fraction` of the examples (rounded, at least one) drawn by `seed` as dev,
    the rest for training, each in file order. A function of (examples, fraction, seed) only,
    so a resumed run holds out the same examples."""
    n = len(dataset.examples)
    k = max(1, round(fraction * n))
    if k >= n:
        raise error(dataset.name, None, "file", f"--eval-split {fraction} of {n} examples leaves none to train on")
    order = list(range(n))
    random.Random(f"eval-split {seed}").shuffle(order)  # its own stream: not the batches' draws
    dev = set(order[:k])
    part = [tuple(e for i, e in enumerate(dataset.examples) if (i in dev) == is_dev) for is_dev in (False, True)]
    return (Dataset(f"{dataset.name} (train part)", dataset.kind, part[0]),
            Dataset(f"{dataset.name} (held-out dev part)", dataset.kind, part[1]))
