"""Update rules (estimator.py) against plain-tensor reference implementations, and their exact
resume in the step loop (on the stand-in engine of test_trainer_loop.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_trainer_loop import StandInEngine

from mezo_vllm.adapter import (
    LoraAdapter,
    LoraSpec,
    LowRank,
    Masked,
    Update,
    model_linear_shapes,
    noise,
)
from mezo_vllm.config import ConfigError, TuneConfig
from mezo_vllm.estimator import (
    FZOO,
    LOZO,
    ZOSGD,
    Curvature,
    Momentum,
    learning_rate,
    make_estimator,
    variant_slots,
)
from mezo_vllm.model import resolve_model
from mezo_vllm.trainer import tune

SHAPES = {"layers.0.q_proj": (6, 5), "layers.0.v_proj": (4, 5)}


def _adapter() -> LoraAdapter:
    g = torch.Generator().manual_seed(0)
    a = LoraAdapter.init(LoraSpec(r=3, alpha=6.0, targets=("q_proj", "v_proj")), SHAPES, seed=1)
    return LoraAdapter(a.spec, {k: torch.randn(v.shape, generator=g) for k, v in a.tensors.items()})


def _z(direction, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    return {k: noise(direction, k, t.shape).double() for k, t in adapter.tensors.items()}


def test_zosgd_averages_n_directions_and_decays():
    adapter, ref = _adapter(), {k: v.double() for k, v in _adapter().tensors.items()}
    update = ZOSGD(weight_decay=0.1).update([3, 4], [2.0, -1.0], lr=0.5)
    adapter.apply(update)
    for k in ref:
        expected = ref[k] * (1 - 0.05) - 0.5 * (2.0 * _z(3, adapter)[k] - 1.0 * _z(4, adapter)[k]) / 2
        assert torch.allclose(adapter.tensors[k].double(), expected, atol=1e-6)


@pytest.mark.parametrize("window", [3, 50])
def test_momentum_matches_a_tensor_reference(window):
    """Momentum as one would write it with tensors, sharing no formula with estimator.py: a
    moving sum S ← βS + (1−β)u − (1−β)βᴷ·u_{t−K} (the estimate leaving the window of K is
    subtracted, kept in a ring buffer of tensors), divided by the weight it holds, 1 − βⁿ for
    the n estimates in it (Adam's bias correction while n < K), and decoupled weight decay.
    Window 50 > steps: the plain bias-corrected EMA; window 3: the truncated one."""
    beta, lr, wd, steps = 0.8, 0.1, 0.05, 9
    adapter = _adapter()
    theta = {k: v.double() for k, v in adapter.tensors.items()}
    estimator = Momentum(weight_decay=wd, beta=beta, window=window)
    moving = {k: torch.zeros_like(v) for k, v in theta.items()}
    ring: list[dict[str, torch.Tensor]] = []  # u of the steps in the window, oldest first
    for t in range(steps):
        seeds, grads = [100 + 2 * t, 101 + 2 * t], [float(t % 3) - 1.0, 0.5 * t]
        adapter.apply(estimator.update(estimator.directions(t, seeds), grads, lr))
        u = {k: (grads[0] * _z(seeds[0], adapter)[k] + grads[1] * _z(seeds[1], adapter)[k]) / 2 for k in theta}
        ring.append(u)
        leaving = ring.pop(0) if len(ring) > window else None
        for k in theta:
            moving[k] = beta * moving[k] + (1 - beta) * u[k]
            if leaving is not None:
                moving[k] -= (1 - beta) * beta ** window * leaving[k]
            held = 1 - beta ** len(ring)
            theta[k] = theta[k] * (1 - lr * wd) - lr * moving[k] / held
    assert all(torch.allclose(adapter.tensors[k].double(), theta[k], atol=1e-5) for k in theta)
    # not vacuous: plain ZO-SGD on the same estimates ends elsewhere
    sgd = _adapter()
    for t in range(steps):
        sgd.apply(ZOSGD(weight_decay=wd).update([100 + 2 * t, 101 + 2 * t], [float(t % 3) - 1.0, 0.5 * t], lr))
    assert max((sgd.tensors[k].double() - theta[k]).abs().max().item() for k in theta) > 1e-2


def test_momentum_restored_from_the_trajectory_continues_identically():
    estimator, records = Momentum(beta=0.9, window=4), []
    for t in range(7):
        grads = [0.3 * t - 1.0]
        if t == 2:  # a skipped step: logged, never applied, not in the window
            records.append({"step": t, "seed": 50 + t, "g": float("nan"), "skipped": True})
            continue
        estimator.update(estimator.directions(t, [50 + t]), grads, 0.1)
        records.append({"step": t, "seed": 50 + t, "g": grads[0]})
    restored = Momentum(beta=0.9, window=4)
    restored.restore(records)
    assert restored.update([99], [1.0], 0.1) == estimator.update([99], [1.0], 0.1)
    two = Momentum(window=4)
    two.restore([{"step": 0, "seeds": [1, 2], "grads": [1.0, 3.0]}])
    assert two.update([5], [0.0], 1.0).terms[1:] == ((1, pytest.approx(-0.1 / 0.19 * 0.9 * 0.5)),
                                                     (2, pytest.approx(-0.1 / 0.19 * 0.9 * 1.5)))


def test_lozo_directions_are_low_rank_with_a_lazy_v():
    lozo = LOZO(rank=2, period=3, seed=7)
    d = [lozo.directions(step, [1000 + step])[0] for step in range(7)]
    z = noise(d[0], "w", torch.Size([40, 30]))
    assert torch.linalg.matrix_rank(z) == 2
    assert 0.7 < z.var().item() < 1.3  # unit-variance entries, like the dense z
    assert noise(d[0], "b", torch.Size([9])).shape == (9,)  # not a matrix: dense
    assert d[0].v_seed == d[1].v_seed == d[2].v_seed != d[3].v_seed  # V shared within a period
    assert len({x.u_seed for x in d}) == 7  # U new every step
    # the update moves each matrix inside the column space of V (rows of V per period)
    v = noise(d[0].v_seed, "w", torch.Size([30, 2]))
    step = noise(d[0], "w", torch.Size([40, 30])) + noise(d[1], "w", torch.Size([40, 30]))
    residual = step - step @ v @ torch.linalg.pinv(v)
    assert residual.abs().max() < 1e-4
    assert LOZO(rank=2, period=3, seed=8).directions(0, [1000])[0].v_seed != d[0].v_seed


def test_make_estimator_and_config_validation():
    assert isinstance(make_estimator("momentum", momentum=0.5, window=2), Momentum)
    assert make_estimator("lozo", lozo_rank=4).directions(0, [1])[0] == LowRank(1, LOZO(seed=0)._v_seed(0, 0), 4)
    for bad, message in [({"estimator": "adam"}, "--estimator must be one of"),
                         ({"momentum": 1.0}, r"--momentum must be in \[0, 1\)"),
                         ({"momentum_window": 0}, "--momentum-window must be ≥ 1"),
                         ({"lozo_period": 0}, "--lozo-period must be ≥ 1"),
                         ({"objective": "accuracy"}, "--objective must be one of")]:
        with pytest.raises(ConfigError, match=message):
            TuneConfig(out="x", task="sst2", **bad).validate()


def _cfg(tmp_path, name, **overrides):
    values = dict(out=str(tmp_path / name), task="sst2", steps=12, lr=1e-3, lr_schedule="constant",
                  eval_every=0, save_every=4, eval_examples=10, normalise=0)
    values.update(overrides)
    return TuneConfig(**values)


def _crash_and_resume_equal_the_whole_run(tmp_path, tokenizer, options) -> dict:
    """A run that crashes at step 9 (checkpoint at 8) and is resumed ends bitwise where an
    uninterrupted one does, with the same trajectory file; returns the uninterrupted adapter."""
    tune(_cfg(tmp_path, "whole", **options), engine=StandInEngine(tokenizer))
    with pytest.raises(Exception, match="engine died"):  # the loop may wrap the engine's error
        tune(_cfg(tmp_path, "crashed", **options), engine=StandInEngine(tokenizer, fail_at_call=11))
    tune(_cfg(tmp_path, "crashed", **options), resume=True, engine=StandInEngine(tokenizer))
    whole = LoraAdapter.load(tmp_path / "whole/adapter").tensors
    resumed = LoraAdapter.load(tmp_path / "crashed/adapter").tensors
    assert all(torch.equal(resumed[k], v) for k, v in whole.items())
    assert (tmp_path / "crashed/trajectory.jsonl").read_text() == (tmp_path / "whole/trajectory.jsonl").read_text()
    return whole


@pytest.mark.parametrize("options", [dict(estimator="momentum", momentum=0.8, momentum_window=5, directions=2),
                                     dict(estimator="lozo", lozo_rank=2, lozo_period=4)])
def test_stateful_estimators_resume_exactly_and_replay(tmp_path, tokenizer, options):
    """A crash at step 9 (checkpoint at 8) and a resume give the adapter of an uninterrupted run,
    which a plain-tensor replay of the trajectory reproduces."""
    whole = _crash_and_resume_equal_the_whole_run(tmp_path, tokenizer, options)

    records = [json.loads(line) for line in (tmp_path / "whole/trajectory.jsonl").read_text().splitlines()]
    replay = LoraAdapter.init(LoraSpec(), model_linear_shapes(resolve_model(None)), seed=0)
    theta = {k: v.double() for k, v in replay.tensors.items()}
    history = []
    for r in records:
        seeds, grads = (r["seeds"], r["grads"]) if "seeds" in r else ([r["seed"]], [r["g"]])
        if options["estimator"] == "lozo":
            v_seeds = [LOZO(seed=0)._v_seed(r["step"] // 4, k) for k in range(len(seeds))]
            dirs = [LowRank(s, v, 2) for s, v in zip(seeds, v_seeds)]
        else:
            dirs = seeds
        step = {k: sum(g * noise(d, k, t.shape).double() for d, g in zip(dirs, grads)) / len(dirs)
                for k, t in replay.tensors.items()}
        if options["estimator"] == "momentum":
            history = [step, *history][:5]
            w = [0.2 * 0.8 ** i for i in range(len(history))]
            step = {k: sum(wi * h[k] for wi, h in zip(w, history)) / sum(w) for k in theta}
        theta = {k: theta[k] - 1e-3 * step[k] for k in theta}
    scale = max(t.abs().max().item() for t in theta.values())  # fp32 vs fp64 rounding, relative
    assert max((whole[k].double() - theta[k]).abs().max().item() for k in theta) < 1e-6 * scale
    assert any(whole[k].abs().max() > 0 for k in whole if "lora_B" in k)


# --------------------------------------------------------------------------- FZOO, masks, schedules

def _small_adapter() -> LoraAdapter:
    """A 3×4 module at rank 2 (14 entries): few enough for a Monte Carlo mean to converge."""
    g = torch.Generator().manual_seed(3)
    a = LoraAdapter.init(LoraSpec(r=2, alpha=2.0, targets=("q_proj",)), {"layers.0.q_proj": (3, 4)}, seed=1)
    return LoraAdapter(a.spec, {k: torch.randn(v.shape, generator=g) for k, v in a.tensors.items()})


class _Quadratic:
    """L(θ) = ½ Σ d·(θ − θ*)² over every entry: its gradient D(θ − θ*) is known exactly."""

    def __init__(self, adapter: LoraAdapter):
        g = torch.Generator().manual_seed(4)
        self.target = {k: torch.randn(t.shape, generator=g).double() for k, t in adapter.tensors.items()}
        self.curvature = {k: 0.5 + 1.5 * torch.rand(t.shape, generator=g).double() for k, t in adapter.tensors.items()}

    def __call__(self, tensors: dict[str, torch.Tensor]) -> float:
        return float(sum((0.5 * self.curvature[k] * (t.double() - self.target[k]) ** 2).sum() for k, t in tensors.items()))

    def gradient(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.curvature[k] * (t.double() - self.target[k]) for k, t in tensors.items()}


def _dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k] * b[k]).sum() for k in a))


def test_fzoo_is_normalised_sgd_on_a_quadratic():
    """Oracle: slot 0 is θ and slot i is θ + εzᵢ, so (Lᵢ − L₀)/ε is ∇L·zᵢ up to the curvature
    term ε/2·zᵢᵀDzᵢ; and the mean update over many steps is −lr·c·∇L/‖∇L‖ (normalised SGD),
    c = E[w₁²/std(w)] for w ~ N(0, Iₙ) (the losses' spread is ε‖∇L‖·std(w))."""
    n, eps, lr, steps = 8, 1e-3, 0.1, 1000
    adapter = _small_adapter()
    loss = _Quadratic(adapter)
    grad = loss.gradient(adapter.tensors)
    norm = math.sqrt(_dot(grad, grad))
    fzoo, total = FZOO(), {k: torch.zeros_like(v) for k, v in grad.items()}
    for step in range(steps):
        directions = fzoo.directions(step, [10_000 + n * step + i for i in range(n)])
        writes = fzoo.variants(directions, eps)
        assert writes[0][1] == 0.0 and [s for _, s in writes[1:]] == [eps] * n
        losses = [loss(v) for v in adapter.variants(writes)]
        assert losses[0] == loss(adapter.tensors)
        if step < 20:
            for d, perturbed in zip(directions, losses[1:]):
                z = _z(d, adapter)
                curvature = 0.5 * eps * float(sum((loss.curvature[k] * z[k] ** 2).sum() for k in z))
                assert abs((perturbed - losses[0]) / eps - _dot(grad, z)) <= 1.01 * curvature + 1e-3 * norm
        update = fzoo.update(directions, fzoo.estimates(losses, eps), lr)
        for d, coeff in update.terms:
            z = _z(d, adapter)
            total = {k: total[k] + coeff * z[k] for k in total}
    mean = {k: v / steps for k, v in total.items()}
    w = np.random.default_rng(0).standard_normal((400_000, n))
    c = float(np.mean(w[:, 0] ** 2 / w.std(axis=1)))
    expected = {k: -lr * c * g / norm for k, g in grad.items()}
    error = {k: mean[k] - expected[k] for k in mean}
    assert math.sqrt(_dot(error, error)) < 0.1 * lr * c  # Monte Carlo error ≈ 0.04·lr·c here
    assert all(math.isnan(g) for g in FZOO().estimates([1.0, 2.0, 2.0], eps))  # σ = 0: a skipped step


def _curvature_along(loss: _Quadratic, z: dict[str, torch.Tensor]) -> float:
    return float(sum((loss.curvature[k] * z[k] ** 2).sum() for k in z))


def test_curvature_divides_g_by_the_measured_curvature_on_a_quadratic():
    """Oracle: on a quadratic the three losses along z give ∇L·z and zᵀDz exactly (up to the
    fp32 variants), so each logged g is ∇L·zᵢ over the mean of zⱼᵀDzⱼ, for one direction and
    lr 1 the step lands on the minimum along z (the slope along z vanishes there), and with a
    window the divisor is the mean over the last K taken steps; a step whose mean curvature is
    not positive is skipped and leaves the window as it was."""
    eps, adapter = 1e-2, _small_adapter()
    loss = _Quadratic(adapter)
    rule = Curvature()
    directions = rule.directions(0, [21, 22, 23])
    writes = rule.variants(directions, eps)
    assert writes == [(21, 0.0), (21, eps), (21, -eps), (22, eps), (22, -eps), (23, eps), (23, -eps)]
    assert variant_slots("curvature", 3) == len(writes) and variant_slots("zo-sgd", 3) == 6
    losses = [loss(v) for v in adapter.variants(writes)]
    grad, zs = loss.gradient(adapter.tensors), [_z(d, adapter) for d in directions]
    mean_curvature = float(np.mean([_curvature_along(loss, z) for z in zs]))
    assert rule.estimates(losses, eps) == pytest.approx([_dot(grad, z) / mean_curvature for z in zs], rel=1e-3)

    newton = Curvature()
    [d] = newton.directions(0, [31])
    g = newton.estimates([loss(v) for v in adapter.variants(newton.variants([d], eps))], eps)
    moved = adapter.copy()
    moved.apply(newton.update([d], g, lr=1.0))
    z = _z(d, adapter)
    assert abs(_dot(loss.gradient(moved.tensors), z)) < 1e-3 * abs(_dot(grad, z))

    windowed, seen = Curvature(normalise=2), []
    for step, seed in enumerate([41, 42, 43]):
        [d] = windowed.directions(step, [seed])
        step_losses = [loss(v) for v in adapter.variants(windowed.variants([d], eps))]
        seen.append(_curvature_along(loss, _z(d, adapter)))
        g = windowed.estimates(step_losses, eps)
        assert g[0] == pytest.approx(_dot(grad, _z(d, adapter)) / np.mean(seen[-2:]), rel=1e-3)
        windowed.update([d], g, lr=0.0)
    probe = windowed.estimates(step_losses, eps)
    assert probe[0] == pytest.approx(_dot(grad, _z(d, adapter)) / seen[-1], rel=1e-3)  # H of step 3, twice
    assert all(math.isnan(g) for g in Curvature().estimates([1.0, 0.5, 0.5], eps))  # L₊ + L₋ − 2L₀ < 0
    assert all(math.isnan(g) for g in windowed.estimates([1.0, 1.0 - 1e3 * eps ** 2, 1.0 - 1e3 * eps ** 2], eps))
    windowed.update([d], probe, lr=0.0)  # the skipped step's H did not join the window
    assert windowed.estimates(step_losses, eps) == probe


def test_sparse_directions_move_only_their_seeded_entries():
    """A Masked direction perturbs and updates the same seeded share of entries (the ± pair and
    the update regenerate it), keeps the dense z there, and its two-sided g is ∇L·z of the
    masked z (exact on a quadratic); b_only leaves every A bitwise as it was."""
    name, shape = "m.lora_B.weight", torch.Size([200, 100])
    z, dense = noise(Masked(5, sparsity=0.75), name, shape), noise(5, name, shape)
    kept = z != 0
    assert 0.24 < kept.float().mean().item() < 0.26
    assert torch.equal(z[kept], dense[kept])
    assert torch.equal(noise(Masked(5, sparsity=0.75), name, shape), z)  # a function of the seed
    assert (noise(Masked(6, sparsity=0.75), name, shape) != 0).ne(kept).float().mean() > 0.3  # another seed, another mask
    assert (noise(Masked(5, sparsity=0.75), "n.lora_B.weight", shape) != 0).ne(kept).float().mean() > 0.3
    low = Masked(LowRank(5, 9, 2), sparsity=0.5)
    assert torch.equal(noise(low, name, shape) != 0, noise(Masked(5, sparsity=0.5), name, shape) != 0)

    adapter = _small_adapter()
    loss, eps = _Quadratic(adapter), 1e-3
    grad = loss.gradient(adapter.tensors)
    for direction in (Masked(7, sparsity=0.5), Masked(7, sparsity=0.5, b_only=True), Masked(7, b_only=True)):
        mask = {k: noise(direction, k, t.shape) != 0 for k, t in adapter.tensors.items()}
        plus, minus = adapter.variants([(direction, eps), (direction, -eps)])
        moved = adapter.copy()
        moved.apply(Update(terms=((direction, 0.5),)))
        for k, t in adapter.tensors.items():
            for changed in (plus[k] != t, minus[k] != t, moved.tensors[k] != t):
                assert torch.equal(changed, mask[k]), k
            if direction.b_only and "lora_A" in k:
                assert not mask[k].any() and torch.equal(moved.tensors[k], t)
        assert any(m.any() for m in mask.values()) and not all(m.all() for m in mask.values())
        g = ZOSGD().estimates([loss(plus), loss(minus)], eps)[0]
        assert g == pytest.approx(_dot(grad, _z(direction, adapter)), rel=1e-3, abs=1e-3)


def _replay(records: list[dict], options: dict) -> dict[str, torch.Tensor]:
    """θ from the trajectory alone, in float64: FZOO's ĝ and Curvature's g/H̄ recomputed from the
    logged losses."""
    replay = LoraAdapter.init(LoraSpec(), model_linear_shapes(resolve_model(None)), seed=0)
    theta = {k: v.double() for k, v in replay.tensors.items()}
    window = options.get("normalise", 0) if options["estimator"] == "zo-sgd" else 0  # the others: their own
    for i, r in enumerate(records):
        seeds, grads = (r["seeds"], r["grads"]) if "seeds" in r else ([r["seed"]], [r["g"]])
        if window:
            recent = [g for q in records[max(0, i + 1 - window):i + 1] for g in q["grads"]]
            rms = math.sqrt(sum(g * g for g in recent) / len(recent))
        if options["estimator"] == "fzoo":
            sigma = float(np.std(r["losses"]))
            assert grads == [(loss - r["loss"]) / sigma for loss in r["losses"]]
        elif options["estimator"] == "curvature":
            kept = records[max(0, i + 1 - options["normalise"]):i + 1]
            curvature = np.mean([np.mean([p + m - 2 * q["loss"] for p, m in zip(q["losses_plus"], q["losses_minus"])])
                                 for q in kept]) / 1e-2 ** 2
            assert grads == pytest.approx([(p - m) / 2e-2 / curvature for p, m in zip(r["losses_plus"], r["losses_minus"])])
        else:
            assert grads[0] == pytest.approx((r["loss_plus"] - r["loss_minus"]) / 2e-2)
        masked = options.get("sparsity", 0.0) or options.get("train_only")
        dirs = [Masked(s, options.get("sparsity", 0.0), options.get("train_only") == "B") if masked else s
                for s in seeds]
        if window:
            grads = [g / rms for g in grads]
        theta = {k: theta[k] - r["lr"] * sum(g * noise(d, k, t.shape).double() for d, g in zip(dirs, grads)) / len(dirs)
                 for k, t in replay.tensors.items()}
    return theta


@pytest.mark.parametrize("options", [dict(estimator="fzoo", directions=3),
                                     dict(estimator="fzoo", directions=2, sparsity=0.5, train_only="B",
                                          lr_schedule="cosine", warmup_steps=3),
                                     dict(estimator="zo-sgd", directions=1, sparsity=0.9, lr_schedule="linear"),
                                     dict(estimator="zo-sgd", directions=2, normalise=5, lr=1e-2),
                                     dict(estimator="curvature", directions=2, normalise=3, lr=0.3)])
def test_new_rules_resume_exactly_and_replay(tmp_path, tokenizer, options):
    """As for the stateful rules: crash at step 9 (checkpoint at 8), resume, bitwise the
    uninterrupted run (--normalise rebuilds its window of g's from the trajectory); a float64
    replay of the trajectory gives the same θ; with --train-only B every A is bitwise its
    initialisation."""
    whole = _crash_and_resume_equal_the_whole_run(tmp_path, tokenizer, options)

    records = [json.loads(line) for line in (tmp_path / "whole/trajectory.jsonl").read_text().splitlines()]
    assert len(records) == 12 and not any(r.get("skipped") for r in records)
    theta = _replay(records, options)
    scale = max(t.abs().max().item() for t in theta.values())
    assert max((whole[k].double() - theta[k]).abs().max().item() for k in theta) < 1e-6 * scale
    init = LoraAdapter.init(LoraSpec(), model_linear_shapes(resolve_model(None)), seed=0).tensors
    b_moved = [(whole[k] != init[k]).float().mean().item() for k in whole if "lora_B" in k]
    assert min(b_moved) > 0
    if options.get("train_only") == "B":
        assert all(torch.equal(whole[k], init[k]) for k in whole if "lora_A" in k)
    if options.get("sparsity") == 0.9:  # 12 directions of 10% each: 1 − 0.9¹² ≈ 72% moved
        assert 0.68 < sum(b_moved) / len(b_moved) < 0.76


def test_normalised_steps_are_scale_free_and_track_the_window():
    """--normalise: g's 10× as large give the same update; each g is divided by the RMS of the
    last K steps' g's (all directions), so a step among steeper ones moves less; Momentum keeps
    the normalised g's in its window and a restored one continues identically."""
    steps = [[1.0, -3.0], [2.0, 0.5], [-4.0, 1.0], [0.25, 0.0]]
    small, large = ZOSGD(normalise=2), ZOSGD(normalise=2)
    for t, grads in enumerate(steps):
        a = small.update([2 * t, 2 * t + 1], grads, 0.1)
        b = large.update([2 * t, 2 * t + 1], [10.0 * g for g in grads], 0.1)
        assert [d for d, _ in a.terms] == [d for d, _ in b.terms]
        assert [c for _, c in a.terms] == pytest.approx([c for _, c in b.terms])
    rms = math.sqrt((16.0 + 1.0 + 0.25 ** 2) / 4)
    assert a.terms == ((6, pytest.approx(-0.1 * 0.25 / rms / 2)), (7, 0.0))
    assert ZOSGD(normalise=3).update([1], [5.0], 0.1).terms == ((1, pytest.approx(-0.1)),)
    assert ZOSGD(normalise=3).update([1], [0.0], 0.1).terms == ((1, 0.0),)
    momentum, records = Momentum(window=3, normalise=2), []
    for t, grads in enumerate(steps[:3]):
        momentum.update([10 * t, 10 * t + 1], grads, 0.1)
        records.append({"step": t, "seeds": [10 * t, 10 * t + 1], "grads": grads})
    restored = Momentum(window=3, normalise=2)
    restored.restore([records[0], {"step": 9, "seed": 1, "g": math.nan, "skipped": True}, *records[1:]])
    assert restored.update([7], [3.0], 0.1) == momentum.update([7], [3.0], 0.1)


def test_schedules_and_warmup():
    lr, steps = 0.5, 10
    assert [learning_rate(lr, "linear", s, steps) for s in range(steps)] == [lr * (1.0 - s / steps) for s in range(steps)]
    assert [learning_rate(lr, "constant", s, steps, warmup=4) for s in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    cosine = [learning_rate(lr, "cosine", s, steps, warmup=2) for s in range(steps)]
    assert cosine[:3] == [0.25, 0.5, 0.5] and cosine[3] < 0.5
    assert cosine[6] == pytest.approx(lr * 0.5) and 0 < cosine[-1] < 0.02  # halfway through the 8 decay steps
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:]))
    assert learning_rate(lr, "linear", 4, steps, warmup=4) == lr and learning_rate(lr, "linear", 7, steps, warmup=4) == lr / 2


def test_new_settings_are_checked():
    fzoo = make_estimator("fzoo", normalise=2)  # σ-normalised already: --normalise leaves its steps alone
    assert isinstance(fzoo, FZOO)
    assert all(fzoo.update([1, 2], grads, 0.1) == FZOO().update([1, 2], grads, 0.1) for grads in ([1.0, 3.0], [10.0, -2.0]))
    assert isinstance(make_estimator("curvature", normalise=4), Curvature)
    assert make_estimator("lozo", sparsity=0.5).directions(0, [1])[0].sparsity == 0.5
    assert make_estimator("momentum", b_only=True).directions(0, [1]) == [Masked(1, 0.0, True)]
    for bad, message in [({"estimator": "fzoo", "directions": 1}, "--estimator fzoo .* needs --directions ≥ 2"),
                         ({"warmup_steps": 300}, "--warmup-steps 300 must be below --steps 300"),
                         ({"normalise": -1}, "--normalise must be ≥ 0"),
                         ({"warmup_steps": -1}, "--warmup-steps must be ≥ 0"),
                         ({"sparsity": 1.0}, r"--sparsity must be in \[0, 1\)"),
                         ({"train_only": "A"}, "--train-only must be one of B"),
                         ({"train_only": "B", "weight_decay": 0.1}, "--weight-decay would shrink it"),
                         ({"lr_schedule": "step"}, "--lr-schedule must be one of constant, linear, cosine")]:
        with pytest.raises(ConfigError, match=message):
            TuneConfig(out="x", task="sst2", **bad).validate()
    TuneConfig(out="x", task="sst2", estimator="fzoo", directions=2, sparsity=0.5, train_only="B",
               lr_schedule="cosine", warmup_steps=10).validate()
