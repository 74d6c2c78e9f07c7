"""Zeroth-order update rules, each expressed in seeds and scalars only.

The projected gradient g = (L(θ+εz) − L(θ−εz)) / 2ε is the directional derivative along z(seed);
an update is a list of (seed, coefficient) terms plus a decay, which every holder of the
master copy can apply by regenerating z (see `adapter.Update`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .adapter import Update


def projected_gradient(loss_plus: float, loss_minus: float, eps: float) -> float:
    return (loss_plus - loss_minus) / (2.0 * eps)


SCHEDULES = ("constant", "linear")


def learning_rate(lr: float, schedule: str, step: int, steps: int) -> float:
    """`linear` decays to 0 at the last step (HF Trainer's default, which MeZO's runs used): a
    constant rate that is fast early makes the late, noisier steps overshoot."""
    if schedule == "linear":
        return lr * (1.0 - step / steps)
    return lr


@dataclass(frozen=True)
class ZOSGD:
    """θ ← θ − lr·(ḡz̄ + wd·θ), with n directions averaged (n-SPSA) when several are given."""

    weight_decay: float = 0.0

    def update(self, seeds: Sequence[int], grads: Sequence[float], lr: float) -> Update:
        n = len(seeds)
        terms = tuple((seed, -lr * g / n) for seed, g in zip(seeds, grads))
        return Update(terms=terms, decay=lr * self.weight_decay)
