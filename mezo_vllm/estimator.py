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
- `FZOO` (Dang et al., ICLR 2026): n one-sided estimates sharing one unperturbed pass (n + 1
  variants instead of 2n), each divided by the spread of the n perturbed losses.
- `Curvature`: the ± pairs plus one unperturbed pass (2n + 1 variants), a clean-pass
  preconditioner after 1.5-SPSA's: the three losses along z also give the curvature zᵀHz, and
  each g is divided by its recent mean, a Newton step along the directions.

Every rule but FZOO and Curvature (normalised their own ways) can divide its g's by their recent RMS (`normalise`):
the step's length is then set by lr alone, whatever the loss's scale, so one lr fits a
two-option cross-entropy (|g| ≈ 1) and a generated answer's NLL (|g| 3-15) alike.

A rule says which variants a step scores (`variants`) and how their losses become g's
(`estimates`), so the step loop is the same for two-sided pairs and for one shared clean pass.
Every rule can perturb only part of the adapter (`adapter.Masked`: a seeded share of the
entries, or the B matrices only).
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from .adapter import Direction, LowRank, Masked, Update


def projected_gradient(loss_plus: float, loss_minus: float, eps: float) -> float:
    return (loss_plus - loss_minus) / (2.0 * eps)


SCHEDULES = ("constant", "linear", "cosine")
ESTIMATORS = ("zo-sgd", "momentum", "lozo", "fzoo", "curvature")


def learning_rate(lr: float, schedule: str, step: int, steps: int, warmup: int = 0) -> float:
    """The rate of `step` (0-based) of `steps`.

    `linear` and `cosine` decay to 0 at the last step (HF Trainer's schedules, which MeZO's runs
    used): a constant rate that is fast early makes the late, noisier steps overshoot. The first
    `warmup` steps ramp up to `lr` ((step + 1)/warmup, so no step is wasted at rate 0), and the
    decay then runs over the steps after them.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "linear":
        return lr * (1.0 - (step - warmup) / (steps - warmup))
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
    return lr


class Estimator(Protocol):
    """What the step loop needs of an update rule."""

    def directions(self, step: int, seeds: Sequence[int]) -> list[Direction]:
        """The perturbation directions of a step, from its seeds (one per estimate)."""

    def variants(self, directions: Sequence[Direction], eps: float) -> list[tuple[Direction, float]]:
        """The variants θ + scale·z(direction) the step scores, all in one engine call; a scale
        of 0.0 is θ itself."""

    def estimates(self, losses: Sequence[float], eps: float) -> list[float]:
        """One g per direction, from the losses of `variants` (in their order)."""

    def loss_record(self, losses: Sequence[float]) -> dict[str, Any]:
        """The losses as the step's trajectory line keeps them (with seeds and g's: a replay)."""

    def update(self, directions: Sequence[Direction], grads: Sequence[float], lr: float) -> Update:
        """The step's update; called once per step whose g's are all finite."""

    def restore(self, records: Sequence[dict[str, Any]]) -> None:
        """Rebuild any state from a resumed run's trajectory lines (steps taken so far)."""


def finite_steps(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trajectory lines of the steps that moved θ: a skipped (non-finite) step did not, and
    enters no rule's state."""
    return [record for record in records if not record.get("skipped")]


def step_grads(record: dict[str, Any]) -> tuple[list[int], list[float]]:
    """(seeds, g's) of a trajectory line (one direction: `seed`, `g`; n: `seeds`, `grads`)."""
    if "seeds" in record:
        return list(record["seeds"]), list(record["grads"])
    return [record["seed"]], [record["g"]]


@dataclass
class ZOSGD:
    """θ ← θ − lr·(ḡz̄ + wd·θ), with n directions averaged (n-SPSA) when several are given.

    Each direction is scored as a ± pair, g = (L(θ+εz) − L(θ−εz))/2ε. `sparsity` and `b_only`
    restrict every direction to part of the adapter (`adapter.Masked`); at their defaults the
    directions are the plain seeds, as before they existed.

    With `normalise` = K > 0 every g is divided by the RMS of the g's of the last K steps (this
    one included), a scalar kept from the g's alone (Adam's second moment for the one
    coordinate SPSA measures, over a window instead of an EMA so that a resumed run rebuilds it
    exactly from the trajectory's last K lines). A loss whose gradient is 5× steeper then takes
    the same step, and a run whose |g| climbs (a step overshooting) is slowed by it.
    """

    weight_decay: float = 0.0
    sparsity: float = 0.0
    b_only: bool = False
    normalise: int = 0
    _recent: deque = field(default_factory=deque, init=False, repr=False)

    def __post_init__(self) -> None:
        self._recent = deque(maxlen=max(self.normalise, 1))

    def _normalised(self, grads: Sequence[float]) -> list[float]:
        """The step's g's over the RMS of the window's; remembers them (call once per step)."""
        if not self.normalise:
            return list(grads)
        self._recent.append(list(grads))
        rms = math.sqrt(float(np.mean([g * g for step in self._recent for g in step])))
        return [g / rms if rms > 0.0 else 0.0 for g in grads]

    def directions(self, step: int, seeds: Sequence[int]) -> list[Direction]:
        return self._masked(seeds)

    def _masked(self, directions: Sequence[Direction]) -> list[Direction]:
        if not (self.sparsity or self.b_only):
            return list(directions)
        return [Masked(d, self.sparsity, self.b_only) for d in directions]

    def variants(self, directions: Sequence[Direction], eps: float) -> list[tuple[Direction, float]]:
        return [(d, sign * eps) for d in directions for sign in (1.0, -1.0)]

    def estimates(self, losses: Sequence[float], eps: float) -> list[float]:
        return [projected_gradient(losses[2 * k], losses[2 * k + 1], eps) for k in range(len(losses) // 2)]

    def loss_record(self, losses: Sequence[float]) -> dict[str, Any]:
        """The first pair's losses: with the seeds and g's, every step replays."""
        return {"loss_plus": losses[0], "loss_minus": losses[1]}

    def update(self, directions: Sequence[Direction], grads: Sequence[float], lr: float) -> Update:
        n = len(directions)
        terms = tuple((d, -lr * g / n) for d, g in zip(directions, self._normalised(grads)))
        return Update(terms=terms, decay=lr * self.weight_decay)

    def restore(self, records: Sequence[dict[str, Any]]) -> None:
        """ZO-SGD's only state is the normaliser's window: the g's of the last K steps taken."""
        self._recent.clear()
        for record in finite_steps(records)[-self.normalise:] if self.normalise else ():
            self._normalised(step_grads(record)[1])


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
        super().__post_init__()
        self._history = deque(maxlen=self.window)

    def _remember(self, directions: Sequence[Direction], grads: Sequence[float]) -> None:
        n = len(directions)
        self._history.appendleft([(d, g / n) for d, g in zip(directions, self._normalised(grads))])

    def update(self, directions: Sequence[Direction], grads: Sequence[float], lr: float) -> Update:
        self._remember(directions, grads)
        norm = (1.0 - self.beta) / (1.0 - self.beta ** len(self._history))
        terms = tuple((d, -lr * norm * self.beta ** k * g)
                      for k, step in enumerate(self._history) for d, g in step)
        return Update(terms=terms, decay=lr * self.weight_decay)

    def restore(self, records: Sequence[dict[str, Any]]) -> None:
        self._history.clear()
        self._recent.clear()
        for record in finite_steps(records):
            seeds, grads = step_grads(record)
            self._remember(self.directions(record["step"], seeds), grads)


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
        return self._masked([LowRank(u_seed=s, v_seed=self._v_seed(step // self.period, k), rank=self.rank)
                             for k, s in enumerate(seeds)])

    def _v_seed(self, period: int, direction: int) -> int:
        digest = hashlib.blake2b(f"lozo-v:{self.seed}:{period}:{direction}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class FZOO(ZOSGD):
    """FZOO (Dang et al., ICLR 2026): n one-sided estimates around one unperturbed pass, each
    divided by the standard deviation σ of the n perturbed losses.

    The step scores n + 1 variants, θ and θ + εzᵢ, and moves θ ← θ − (lr/n)·Σ ĝᵢzᵢ with
    ĝᵢ = (L(θ+εzᵢ) − L(θ))/σ, σ the population std of the L(θ+εzᵢ), as the authors' code
    computes it (DKmiyan/FZOO, `zo_step`; the paper's formula has a further 1/ε). Since
    L(θ+εzᵢ) − L(θ) ≈ ε∇L·zᵢ and σ ≈ ε‖∇L‖, ĝᵢ ≈ ∇L·zᵢ/‖∇L‖: this is normalised SGD, whose
    step length is lr whatever the gradient's scale or ε (a steep batch takes no bigger
    step than a flat one), so its lr is not ZO-SGD's. The authors perturb with Rademacher
    ±1 vectors for GPU speed; z here is the same seeded Gaussian as for every rule. σ = 0
    (all perturbed losses equal) gives no estimate: the step is skipped as non-finite.
    """

    def variants(self, directions: Sequence[Direction], eps: float) -> list[tuple[Direction, float]]:
        return [(directions[0], 0.0), *((d, eps) for d in directions)]

    def estimates(self, losses: Sequence[float], eps: float) -> list[float]:
        clean, perturbed = losses[0], list(losses[1:])
        sigma = float(np.std(perturbed))
        if not sigma > 0.0:
            return [math.nan] * len(perturbed)
        return [(loss - clean) / sigma for loss in perturbed]

    def loss_record(self, losses: Sequence[float]) -> dict[str, Any]:
        """L(θ), the batch loss itself, and the n perturbed losses (ĝ replays from them)."""
        return {"loss": losses[0], "losses": list(losses[1:])}

    def _normalised(self, grads: Sequence[float]) -> list[float]:
        """ĝ is divided by σ already: `normalise` is ignored, not applied twice."""
        return list(grads)


@dataclass
class Curvature(ZOSGD):
    """ZO-SGD preconditioned by the curvature measured along its own directions.

    A step scores θ and the n pairs θ ± εzᵢ (2n + 1 variants, one engine call). 1.5-SPSA
    (Chaubard et al., 2026) preconditions with one clean forward pass; its paper was not
    reachable offline, so this is the preconditioner those losses give, not a transcription of
    its update. From the three losses along zᵢ come the slope
    gᵢ = (L₊ − L₋)/2ε and the curvature hᵢ = (L₊ + L₋ − 2L₀)/ε² = zᵢᵀHzᵢ + O(ε²) (exact on a
    quadratic). Each g is divided by H̄, the mean of the step curvatures H = mean hᵢ over the
    last K = `normalise` steps (this one included; K = 0: this step's alone), so the update
    θ ← θ − (lr/n)·Σ (gᵢ/H̄)·zᵢ is, for n = 1 and lr = 1, the minimum of the quadratic model
    along z: lr is a fraction of a Newton step, with no scale of its own. A high-dimensional
    Gaussian z has zᵀHz ≈ tr H, so H̄ tracks the sharpening of the loss as |g| does for
    `normalise` on ZO-SGD, but with the scale a step along z can bear. Only scalars are kept:
    the last K step curvatures, rebuilt on resume from the losses the trajectory keeps. A
    window mean that is not positive (noise or a concave stretch) gives no step: it is skipped.

    The logged g's are gᵢ/H̄, so an update replays from them alone (as FZOO's ĝ).

    The second difference needs precise losses: in bf16 at ε 1e-2 it is mostly rounding (SST-2:
    step H from −225 to 170 around a mean of 2; fp32: 32, docs/results.md), so use fp32. A larger
    ε is no way out: at 1e-1, LoRA's ε²·z_B z_A term makes g uncorrelated with the slope.
    """

    _curvatures: deque = field(default_factory=deque, init=False, repr=False)  # ε²H of the last K steps
    _pending: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._curvatures = deque(maxlen=max(self.normalise, 1))

    def variants(self, directions: Sequence[Direction], eps: float) -> list[tuple[Direction, float]]:
        return [(directions[0], 0.0), *super().variants(directions, eps)]

    @staticmethod
    def second_difference(losses: Sequence[float]) -> float:
        """ε²H of a step: the mean of L₊ + L₋ − 2L₀ over its directions. The window keeps these,
        not H, so a resumed run rebuilds it from the logged losses alone (ε is the run's)."""
        clean, pairs = losses[0], losses[1:]
        return float(np.mean([pairs[2 * k] + pairs[2 * k + 1] - 2.0 * clean for k in range(len(pairs) // 2)]))

    def estimates(self, losses: Sequence[float], eps: float) -> list[float]:
        """gᵢ/H̄; H̄ takes this step's H in only if `update` follows (a skipped step leaves no trace)."""
        grads = super().estimates(losses[1:], eps)
        step = self.second_difference(losses)
        kept = list(self._curvatures)
        if len(kept) == self._curvatures.maxlen:
            kept = kept[1:]  # the oldest leaves as this step's joins
        mean = float(np.mean([*kept, step])) / eps ** 2
        if not (math.isfinite(mean) and mean > 0.0):
            self._pending = None
            return [math.nan] * len(grads)
        self._pending = step
        return [g / mean for g in grads]

    def loss_record(self, losses: Sequence[float]) -> dict[str, Any]:
        """L(θ) and every pair's losses: the curvatures (and so the g's) replay from them."""
        return {"loss": losses[0], "losses_plus": list(losses[1::2]), "losses_minus": list(losses[2::2])}

    def _normalised(self, grads: Sequence[float]) -> list[float]:
        """The g's are divided by H̄ already; the step's H joins the window as it is taken."""
        if self._pending is not None:
            self._curvatures.append(self._pending)
            self._pending = None
        return list(grads)

    def restore(self, records: Sequence[dict[str, Any]]) -> None:
        self._curvatures.clear()
        self._pending = None
        for record in finite_steps(records)[-self._curvatures.maxlen:]:
            pairs = [loss for pair in zip(record["losses_plus"], record["losses_minus"]) for loss in pair]
            self._curvatures.append(self.second_difference([record["loss"], *pairs]))


def variant_slots(estimator: str, directions: int) -> int:
    """The LoRA slots a step of `estimator` fills: 2n (pairs; FZOO's n + 1 fit), 2n + 1 with the
    clean pass of `curvature`."""
    return 2 * directions + (estimator == "curvature")


def make_estimator(name: str, weight_decay: float = 0.0, momentum: float = 0.9, window: int = 16,
                   lozo_rank: int = 2, lozo_period: int = 50, seed: int = 0, sparsity: float = 0.0,
                   b_only: bool = False, normalise: int = 0) -> Estimator:
    """The estimator a run's settings name (TuneConfig has validated them)."""
    masks = dict(sparsity=sparsity, b_only=b_only, normalise=normalise)
    if name == "momentum":
        return Momentum(weight_decay, beta=momentum, window=window, **masks)
    if name == "lozo":
        return LOZO(weight_decay, rank=lozo_rank, period=lozo_period, seed=seed, **masks)
    if name == "fzoo":
        return FZOO(weight_decay, **masks)
    if name == "curvature":
        return Curvature(weight_decay, **masks)
    if name == "zo-sgd":
        return ZOSGD(weight_decay, **masks)
    raise ValueError(f"unknown estimator {name!r}; known: {', '.join(ESTIMATORS)}")
