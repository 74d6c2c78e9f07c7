"""The checks of `mezo-vllm validate`, each a function of engines, data and seeds that returns
its figures: (1) per-token log-probs and losses against the transformers + PEFT oracle, (2) g
against the autograd directional derivative ∇L·z and the cosine of n-estimate averages with the
gradient, (5) the ε sweep and a loss that does not depend on the adapter, (6) shared prefixes
and the bias of reusing the +εz pass's prompt KV. `validate.py` runs them and writes the report;
tests/test_oracle.py asserts their thresholds.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .adapter import LoraAdapter, LoraSpec, noise
from .data import COMPLETION, Dataset, Example, Request
from .estimator import projected_gradient
from .objective import batch_loss, example_losses

LOSS_TOL = 1e-4  # |Δ| of per-token log-probs and per-example losses, vLLM vs reference (fp32)
GRAD_TOL = 0.01  # relative error of g at ε = GRAD_EPS vs ∇L·z
GRAD_EPS = 1e-3
SHARE_TOL = 1e-5  # |Δ loss| with and without shared-prefix cache reads
EPS_SWEEP = tuple(10.0 ** -k for k in range(10, 0, -1))
REUSE_EPS = (1e-2, 1e-3)
COSINE_NS = (1, 10, 50, 100, 500)
DEMOS = 4  # demonstrations in the shared few-shot prefix of check 6


def random_adapter(spec: LoraSpec, shapes: dict[str, tuple[int, int]], seed: int = 0) -> LoraAdapter:
    """PEFT's initialisation with B drawn too: with B = 0 the loss has no gradient in A, and a
    check at θ₀ alone would never see an error in how A is perturbed."""
    adapter = LoraAdapter.init(spec, shapes, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for key, t in adapter.tensors.items():
        if "lora_B" in key:
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    return adapter


def mean_loss(dataset: Dataset, requests: Sequence[Request], sums: np.ndarray) -> float:
    return float(batch_loss(dataset.examples, dataset.kind, requests, sums))


def _column_sums(token_logprobs: Sequence[np.ndarray]) -> np.ndarray:
    """What `score` returns, from `token_logprobs`' [n_targets, columns] arrays."""
    return np.concatenate([t.sum(0) for t in token_logprobs])


def g_of(engine: Any, dataset: Dataset, requests: Sequence[Request], seed: int, eps: float) -> float:
    """One MeZO estimate: slots ← θ±εz(seed), one scoring call, (L+ − L−)/2ε."""
    engine.write_variants([(seed, eps), (seed, -eps)])
    plus, minus = engine.score(requests, [0, 1])
    return projected_gradient(mean_loss(dataset, requests, plus), mean_loss(dataset, requests, minus), eps)


def relative_error(g: float, exact: float) -> float:
    return abs(g - exact) / abs(exact) if exact else (0.0 if g == exact else math.inf)


# ----------------------------------------------------------------------------- check 1


def loss_agreement(engine: Any, reference: Any, parts: Sequence[tuple[Dataset, list[Request]]],
                   seed: int, eps: float) -> list[dict[str, Any]]:
    """Max |Δ| of per-token log-probs and per-example losses, vLLM vs reference, for the base
    model and both variants of a step (θ±εz); all parts' requests in one engine call."""
    requests = [r for _, reqs in parts for r in reqs]
    rows = []
    for e in (engine, reference):
        e.write_variants([(seed, eps), (seed, -eps)])
    variants = [None, 0, 1]
    ours, theirs = engine.token_logprobs(requests, variants), reference.token_logprobs(requests, variants)
    for name, v, mine, ref in zip(("no adapter", "θ+εz", "θ−εz"), variants, ours, theirs):
        token_diff = max(float(np.abs(a - b).max()) for a, b in zip(mine, ref))
        loss_diff, at = 0.0, 0
        for dataset, reqs in parts:
            a, b = (example_losses(dataset.examples, dataset.kind, reqs, _column_sums(side[at : at + len(reqs)]))
                    for side in (mine, ref))
            loss_diff = max(loss_diff, float((a - b).abs().max()))
            at += len(reqs)
        rows.append({"variant": name, "max_token_logprob_diff": token_diff, "max_loss_diff": loss_diff,
                     "tokens": int(sum(t.size for t in mine))})
    return rows


# ----------------------------------------------------------------------------- check 2


def gradient_agreement(engine: Any, reference: Any, dataset: Dataset, requests: Sequence[Request],
                       gradient: dict[str, torch.Tensor], seeds: Sequence[int],
                       eps: float = GRAD_EPS) -> list[dict[str, float]]:
    """g from vLLM and from the reference (same finite difference) vs the exact ∇L·z."""
    rows = []
    for seed in seeds:
        exact = reference_directional(gradient, seed)
        g_vllm = g_of(engine, dataset, requests, seed, eps)
        g_ref = g_of(reference, dataset, requests, seed, eps)
        rows.append({"seed": seed, "exact": exact, "g_vllm": g_vllm, "g_reference": g_ref,
                     "rel_err_vllm": relative_error(g_vllm, exact),
                     "rel_err_reference": relative_error(g_ref, exact)})
    return rows


def reference_directional(gradient: dict[str, torch.Tensor], seed: int) -> float:
    from .reference import directional_derivative

    return directional_derivative(gradient, seed)


def cosine_vs_n(gradient: dict[str, torch.Tensor], g_of_seed: Callable[[int], float], ns: Sequence[int],
                seed0: int = 1000) -> list[float]:
    """cos(ĝₙ, ∇L) for ĝₙ = (1/n) Σᵢ gᵢ z(seed0+i), at each n of `ns` (one running sum)."""
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in gradient.items()}
    flat_g = torch.cat([v.flatten().double() for v in gradient.values()])
    out, n = [], 0
    for target in sorted(ns):
        while n < target:
            g = g_of_seed(seed0 + n)
            for k, t in total.items():
                t.add_(noise(seed0 + n, k, t.shape).double(), alpha=g)
            n += 1
        flat = torch.cat([v.flatten() for v in total.values()])
        out.append(float(torch.dot(flat, flat_g) / (flat.norm() * flat_g.norm())))
    return out


def cosine_theory(n: int, d: int) -> float:
    """E cos(ĝₙ, ∇L) for Gaussian z: |ĝₙ|² ≈ |∇L|²(n + d − 1)/n, ⟨ĝₙ, ∇L⟩ ≈ |∇L|²."""
    return math.sqrt(n / (n + d - 1))


# ----------------------------------------------------------------------------- check 5


def eps_sweep(engine: Any, dataset: Dataset, requests: Sequence[Request], exact: dict[int, float],
              epss: Sequence[float] = EPS_SWEEP) -> list[dict[str, Any]]:
    """Relative error of g vs ∇L·z over ε: truncation error (∝ ε²) on the right, fp32 rounding
    of L± (∝ 1/ε) on the left."""
    rows = []
    for eps in epss:
        gs = {seed: g_of(engine, dataset, requests, seed, eps) for seed in exact}
        errs = [relative_error(g, exact[s]) for s, g in gs.items()]
        rows.append({"eps": eps, "all_finite": all(math.isfinite(g) for g in gs.values()),
                     "median_rel_err": float(np.median(errs)), "max_rel_err": float(np.max(errs))})
    return rows


def query_only_requests(requests: Sequence[Request]) -> list[Request]:
    """Two tokens each, scored on the second: position 0 attends to itself only, with softmax
    weight exactly 1 whatever its query, so a LoRA on q_proj cannot change this loss."""
    return [Request(i, 0, r.token_ids[:2], 1) for i, r in enumerate(requests)]


def adapter_independent_g(engine: Any, adapter: LoraAdapter, shapes: dict[str, tuple[int, int]],
                          requests: Sequence[Request], seeds: Sequence[int], eps: float = 1e-2
                          ) -> list[float] | None:
    """g for a loss that does not depend on the adapter (q_proj-only LoRA, first-position
    predictions): must be exactly 0, and the slots really differ. None if the model has no q_proj."""
    if not any(m.endswith("q_proj") for m in shapes):
        return None
    spec = LoraSpec(r=adapter.spec.r, alpha=adapter.spec.alpha, targets=("q_proj",))
    q_only = random_adapter(spec, shapes)
    reqs = query_only_requests(requests)
    dataset = Dataset("first tokens", COMPLETION, tuple(Example("", ("",), None) for _ in reqs))
    engine.load_master(q_only)
    try:
        return [g_of(engine, dataset, reqs, seed, eps) for seed in seeds]
    finally:
        engine.load_master(adapter)


# ----------------------------------------------------------------------------- check 6


def few_shot(dataset: Dataset, demos: int, n: int) -> Dataset:
    """Examples after the same `demos` demonstrations (prompt + right answer): a shared prefix."""
    shown = dataset.examples[:demos]
    prefix = "".join(e.prompt + e.targets[e.label if e.label is not None else 0] + "\n\n" for e in shown)
    rest = dataset.examples[demos : demos + n]
    return Dataset(f"{dataset.name} few-shot", dataset.kind,
                   tuple(replace(e, prompt=prefix + e.prompt) for e in rest))


def prefix_sharing_agreement(engine: Any, dataset: Dataset, requests: Sequence[Request],
                             seed: int, eps: float = 1e-2) -> dict[str, float]:
    """Max |Δ loss| of the ± variants with shared-prefix cache reads vs without."""
    engine.write_variants([(seed, eps), (seed, -eps)])
    shared = engine.token_logprobs(requests, [0, 1], share_prefix=True)
    alone = engine.token_logprobs(requests, [0, 1], share_prefix=False)
    diff = 0.0
    for a, b in zip(shared, alone):
        la, lb = (example_losses(dataset.examples, dataset.kind, requests, _column_sums(side)) for side in (a, b))
        diff = max(diff, float((la - lb).abs().max()))
    return {"max_loss_diff": diff, "requests": len(requests),
            "context_tokens": int(np.mean([r.span_start for r in requests]))}


def kv_reuse_error(reference: Any, dataset: Dataset, requests: Sequence[Request],
                   exact: dict[int, float], epss: Sequence[float] = REUSE_EPS) -> list[dict[str, Any]]:
    """g when the −εz pass reuses the +εz pass's prompt KV (emulated in the reference engine,
    token-granular) vs the exact g, both against ∇L·z."""
    rows = []
    for eps in epss:
        for seed, d in exact.items():
            reference.write_variants([(seed, eps), (seed, -eps)])
            plus = reference.score_one_by_one(requests, 0)
            minus = reference.score_one_by_one(requests, 1)
            reused = reference.score_reusing_prompt_kv(requests, donor=0, variant=1)
            l_plus = mean_loss(dataset, requests, plus)
            g_exact = projected_gradient(l_plus, mean_loss(dataset, requests, minus), eps)
            g_reuse = projected_gradient(l_plus, mean_loss(dataset, requests, reused), eps)
            rows.append({"eps": eps, "seed": seed, "exact": d, "g_exact": g_exact, "g_reuse": g_reuse,
                         "rel_err_exact": relative_error(g_exact, d),
                         "rel_err_reuse": relative_error(g_reuse, d)})
    return rows
