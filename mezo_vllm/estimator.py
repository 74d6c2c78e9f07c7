"""Zeroth-order update rules, each expressed in seeds and scalars only.

The projected gradient g = (L(θ+εz) − L(θ−εz)) / 2ε is the directional derivative along z(seed);
an update is a list of (direction, coefficient) terms plus a decay, which every holder of the
master copy can apply by regenerating z (see `adapter.Update`). So no rule here keeps a tensor:

- `ZOSGD`: θ ← θ − lr·(ḡz̄ + wd·θ), the n directions of a step averaged (n-SPSA).
- `Momentum`: ZO-SGD on an exponential moving average of the last `window` estimates,
  m = Σₖ wₖ·gₜ₋ₖ·zₜ₋ₖ, rebuilt every step from their seeds and g's instead of stored as a
  second adapter-sized buffer; the cost is `window` z regenerations per step, and exact resume
  needs only the trajectory's last `window` lines.
- `LOZO` (Chen et al., 2024): low-rank directions z = U·Vᵀ/√k per matrix, U redrawn every step,
  V every `period` steps; each matrix moves in a k-dimensional subspace of its columns for a
  while, which lowers the estimate's variance for the same number of forward passes.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from .adapter import Direction, LowRank, Update


def projected_gradient(loss_plus: float, loss_minus: float, eps: float) -> float:
    return (loss_plus - loss_minus) / (2.0 * eps)


SCHEDULES = ("constant", "linear")
ESTIMATORS = ("zo-sgd", "momentum", "lozo")


def learning_rate(lr: float, schedule: str, step: int, steps: int) -> float:
    """`linear` decays to 0 at the last step (HF Trainer's default, which MeZO's runs used): a
    constant rate that is fast early makes the late, noisier steps overshoot."""
    if schedule == "linear":
        return lr * (1.0 - step / steps)
    return lr


class Estimator(Protocol):
    """What the step loop needs of an update rule."""

    def directions(self, step: int, seeds: Sequence[int]) -> list[Direction]:
        """The perturbation directions of a step, from its seeds (one per ±ε pair)."""

    def update(self, directions: Sequence[Direction], grads: Sequence[float], lr: float) -> Update:
        """The step's update; called once per step whose g's are all finite."""

    def restore(self, records: Sequence[dict[str, Any]]) -> None:
        """Rebuild any state from a resumed run's trajectory lines (steps taken so far)."""


def _step_grads(record: dict[str, Any]) -> tuple[list[int], list[float]]:
    """(seeds, g's) of a trajectory line (one direction: `seed`, `g`; n: `seeds`, `grads`)."""
    if "seeds" in record:
        return list(record["seeds"]), list(record["grads"])
    return [record["seed"]], [record["g"]]


@dataclass
class ZOSGD:
    """θ ← θ − lr·(ḡz̄ + wd·θ), with n directions averaged (n-SPSA) when several are given."""

    weight_decay: float = 0.0

    def directions(self, step: int, seeds: Sequence[int]) -> list[Direction]:
        return list(seeds)

    def update(self, directions: Sequence[Direction], grads: Sequence[float], lr: float) -> Update:
        n = len(directions)
        terms = tuple((d, -lr * g / n) for d, g in zip(directions, grads))
        return Update(terms=terms, decay=lr * self.weight_decay)

    def restore(self, records: Sequence[dict[str, Any]]) -> None:
        """ZO-SGD keeps no state between steps: nothing to rebuild."""


@dataclass
class Momentum(ZOSGD):
    """θ ← θ − lr·(m + wd·θ), m = Σₖ₌₀^{K−1} wₖ·ḡₜ₋ₖz̄ₜ₋ₖ with wₖ = (1−β)βᵏ/(1−βᴷ).

    This is the EMA form of momentum (m ← βm + (1−β)ḡz̄, so lr means what it means for ZO-SGD)
    truncated to the last K = `window` steps and renormalised to weights summing to 1: the
    mass βᴷ of older steps is dropped rather than kept in an adapter-sized buffer. Skipped
    (non-finite) steps do not enter the window.
    """

    beta: float = 0.9
    window: int = 16
    _history: deque = field(default_factory=deque, init=False, repr=False)

    def __post_init__(self) -> None:
        self._history = deque(maxlen=self.window)

    def update(self, directions: Sequence[Direction], grads: Sequence[float], lr: float) -> Update:
        n = len(directions)
        self._history.appendleft([(d, g / n) for d, g in zip(directions, grads)])
        norm = (1.0 - self.beta) / (1.0 - self.beta ** len(self._history))
        terms = tuple((d, -lr * norm * self.beta ** k * g)
                      for k, step in enumerate(self._history) for d, g in step)
        return Update(terms=terms, decay=lr * self.weight_decay)

    def restore(self, records: Sequence[dict[str, Any]]) -> None:
        self._history.clear()
        for record in records:
            if record.get("skipped"):
                continue
            seeds, grads = _step_grads(record)
            directions = self.directions(record["step"], seeds)
            self._history.appendleft([(d, g / len(seeds)) for d, g in zip(directions, grads)])


@dataclass
class LOZO(ZOSGD):
    """ZO-SGD along low-rank directions z = U·Vᵀ/√rank per matrix (`adapter.LowRank`).

    U comes from the step's seed; V from (run seed, step // period, direction index), so it is
    shared by `period` consecutive steps (LOZO's lazy sampling of V). 1/√rank gives z's entries
    unit variance, as the dense Gaussian's, so lr and ε mean the same as for ZO-SGD.
    """

    rank: int = 2
    period: int = 50
    seed: int = 0

    def directions(self, step: int, seeds: Sequence[int]) -> list[Direction]:
        return [LowRank(u_seed=s, v_seed=self._v_seed(step // self.period, k), rank=self.rank)
                for k, s in enumerate(seeds)]

    def _v_seed(self, period: int, direction: int) -> int:
        digest = hashlib.blake2b(f"lozo-v:{self.seed}:{period}:{direction}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_estimator(name: str, weight_decay: float = 0.0, momentum: float = 0.9, window: int = 16,
                   lozo_rank: int = 2, lozo_period: int = 50, seed: int = 0) -> Estimator:
    """The estimator a run's settings name (TuneConfig has validated them)."""
    if name == "momentum":
        return Momentum(weight_decay, beta=momentum, window=window)
    if name == "lozo":
        return LOZO(weight_decay, rank=lozo_rank, period=lozo_period, seed=seed)
    if name == "zo-sgd":
        return ZOSGD(weight_decay)
    raise ValueError(f"unknown estimator {name!r}; known: {', '.join(ESTIMATORS)}")
