"""The correctness oracle: the vLLM engine against transformers + PEFT (reference.py) and
against exact arithmetic. Speed work must never change a number; these tests catch it.

1 losses, 2 gradient, 3 trajectories, 4 exact restore, 5 edge cases, 6 prefix sharing (issue #4).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from mezo_vllm import checks as V
from mezo_vllm.adapter import LoraAdapter, LoraSpec, model_linear_shapes
from mezo_vllm.config import TuneConfig
from mezo_vllm.data import CLASSIFICATION, COMPLETION, Dataset, Example, Split, load_task, tokenize
from mezo_vllm.estimator import ZOSGD
from mezo_vllm.reference import ReferenceEngine, directional_derivative
from mezo_vllm.trainer import tune

SEEDS = (1, 2, 3, 4, 5)


@pytest.fixture(scope="module")
def reference(model_dir, initial_adapter) -> ReferenceEngine:
    return ReferenceEngine(model_dir, initial_adapter)


@pytest.fixture(scope="module")
def mixed(tokenizer) -> list[tuple[Dataset, list]]:
    """16 examples of real text: 8 classification (SST-2; 4 of them after the same few-shot
    demonstrations) and 8 completion (SQuAD, a pair of questions on the same passage, one
    256-token prompt; short SST-2 continuations of 5-10 tokens)."""
    sst2 = load_task("sst2").train.examples
    classification = list(sst2[:4]) + list(V.few_shot(Dataset("sst2", CLASSIFICATION, sst2[12:]), 4, 4).examples)
    squad = load_task("squad").train.examples
    by_passage: dict[str, list[Example]] = {}
    for e in squad:
        by_passage.setdefault(e.prompt.split("\nQuestion:")[0], []).append(e)
    pairs = [group[:2] for group in by_passage.values() if len(group) >= 2][:1]
    long = Example("\n\n".join(e.prompt for e in squad[:4]), squad[4].targets, None)
    short = []
    for e in sst2[40:]:
        words = e.prompt.split()
        if len(words) >= 6:
            short.append(Example(" ".join(words[:3]), (" " + " ".join(words[3:5]),), None))
        if len(short) == 3:
            break
    completion = [e for pair in pairs for e in pair] + list(squad[5:7]) + [long] + short
    parts = []
    for kind, examples in ((CLASSIFICATION, classification), (COMPLETION, completion)):
        dataset = Dataset(kind, kind, tuple(examples))
        requests, _ = tokenize(dataset.examples, tokenizer, 256)
        parts.append((dataset, requests))
    lengths = [len(r.token_ids) for _, reqs in parts for r in reqs]
    assert len(classification) + len(completion) == 16
    assert min(lengths) <= 8 and max(lengths) == 256, (min(lengths), max(lengths))
    return parts


@pytest.fixture(scope="module")
def sst2_batch(tokenizer) -> tuple[Dataset, list]:
    dataset = Dataset("sst2", CLASSIFICATION, load_task("sst2").train.examples[100:108])
    return dataset, tokenize(dataset.examples, tokenizer, 1024)[0]


@pytest.fixture(scope="module")
def adapter(model_dir) -> LoraAdapter:
    """Non-zero B, so that A has a gradient too."""
    return V.random_adapter(LoraSpec(), model_linear_shapes(model_dir))


@pytest.fixture
def loaded(engine_fp32, reference, adapter) -> LoraAdapter:
    """Both engines at the same adapter (tests before may have left others)."""
    for e in (engine_fp32, reference):
        e.load_master(adapter)
    return adapter


# ----------------------------------------------------------------------------- 1. losses


def test_losses_equal_the_reference(engine_fp32, reference, loaded, mixed):
    rows = V.loss_agreement(engine_fp32, reference, mixed, seed=1, eps=1e-2)
    assert [r["variant"] for r in rows] == ["no adapter", "θ+εz", "θ−εz"]
    for r in rows:
        assert r["max_token_logprob_diff"] < V.LOSS_TOL, r
        assert r["max_loss_diff"] < V.LOSS_TOL, r
    # the comparison has teeth: the variants and the base model score differently
    requests = [r for _, reqs in mixed for r in reqs]
    sums = engine_fp32.score(requests, [None, 0, 1])
    assert np.abs(sums[0] - sums[1]).max() > 1e-2 and np.abs(sums[1] - sums[2]).max() > 1e-3


def test_differentiable_loss_is_the_trainers_loss(engine_fp32, reference, loaded, sst2_batch, mixed,
                                                  tokenizer):
    """The loss autograd differentiates (the reference, one example at a time, through
    `Request.candidates`) is the loss the trainer computes from the engine's sums (COPA:
    options of several tokens, scored by their mean; SST-2: options merged in one request)."""
    copa = Dataset("copa", CLASSIFICATION, load_task("copa").train.examples[:6])
    for dataset, requests in [sst2_batch, mixed[1], (copa, tokenize(copa.examples, tokenizer, 1024)[0])]:
        engine_fp32.write_variants([(0, 0.0)])
        trainer_loss = V.mean_loss(dataset, requests, engine_fp32.score(requests, [0])[0])
        autograd_loss, _ = reference.gradient(dataset.examples, dataset.kind, requests)
        assert autograd_loss == pytest.approx(trainer_loss, abs=V.LOSS_TOL)
        assert abs(trainer_loss) > 0.1


# ----------------------------------------------------------------------------- 2. gradient


@pytest.fixture(scope="module")
def gradient(reference, adapter, sst2_batch) -> dict[str, torch.Tensor]:
    """The exact gradient of the batch loss at `adapter`, by autograd on the reference."""
    dataset, requests = sst2_batch
    reference.load_master(adapter)
    return reference.gradient(dataset.examples, dataset.kind, requests)[1]


def test_g_equals_the_autograd_directional_derivative(engine_fp32, reference, loaded, sst2_batch, gradient):
    dataset, requests = sst2_batch
    rows = V.gradient_agreement(engine_fp32, reference, dataset, requests, gradient, SEEDS)
    for r in rows:
        assert r["rel_err_vllm"] < V.GRAD_TOL, r
        assert abs(r["exact"]) > 0.1, r  # a real derivative, not a near-zero one


def test_cosine_with_the_gradient_grows_as_theory_says(engine_fp32, sst2_batch, gradient, loaded):
    d = loaded.num_params()
    ns = V.COSINE_NS
    exact = V.cosine_vs_n(gradient, lambda s: directional_derivative(gradient, s), ns)
    theory = [V.cosine_theory(n, d) for n in ns]
    assert all(a < b for a, b in zip(exact[1:], exact[2:])), exact  # grows from n = 10 on
    for n, c, t in zip(ns, exact, theory):
        if n >= 50:
            assert 0.6 * t < c < 1.6 * t, (n, c, t)
    dataset, requests = sst2_batch
    real = V.cosine_vs_n(gradient, lambda s: V.g_of(engine_fp32, dataset, requests, s, V.GRAD_EPS), [10])
    assert real[0] == pytest.approx(exact[1], rel=0.01)  # same z's: vLLM's g's give the same ĝ


# ----------------------------------------------------------------------------- 3, 4. trajectories


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    """SST-2 training examples as a data file: a run with --data and no dev split evaluates
    nothing, so the slots after the last step still hold its ± variants."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": e.prompt, "options": list(e.targets), "label": e.label}
            for e in load_task("sst2").train.examples[:200]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(tmp_path, name, train_file, steps, **overrides):
    """Plain ZO-SGD (no --normalise): each logged g is the whole of its update."""
    return TuneConfig(out=str(tmp_path / name), data=train_file, steps=steps, batch_size=4, directions=1,
                      eval_every=0, save_every=0, normalise=0, **overrides)


def _replay(initial: LoraAdapter, records: list[dict], upto: int) -> LoraAdapter:
    adapter = initial.copy()
    for r in records[:upto]:
        adapter.apply(ZOSGD().update([r["seed"]], [r["g"]], r["lr"]))
    return adapter


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "trajectory.jsonl").read_text().splitlines()]


def test_vllm_and_reference_trajectories_agree(engine_fp32, tmp_path, train_file):
    tune(_config(tmp_path, "vllm", train_file, 10), engine=engine_fp32)
    tune(_config(tmp_path, "reference", train_file, 10, engine="reference"))  # start_engine's choice
    a = LoraAdapter.load(tmp_path / "vllm" / "adapter").tensors
    b = LoraAdapter.load(tmp_path / "reference" / "adapter").tensors
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    ga = [r["g"] for r in _records(tmp_path / "vllm")]
    gb = [r["g"] for r in _records(tmp_path / "reference")]
    assert np.max(np.abs(ga)) > 0.1 and np.allclose(ga, gb, rtol=0, atol=1e-2)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3  # it trained


def test_slots_and_master_are_bitwise_the_replayed_trajectory(engine_fp32, tmp_path, train_file, model_dir):
    cfg = _config(tmp_path, "run", train_file, 40)
    tune(cfg, engine=engine_fp32)
    records = _records(tmp_path / "run")
    assert len(records) == 40
    spec = LoraSpec(r=cfg.rank, alpha=cfg.alpha, targets=cfg.targets)
    initial = LoraAdapter.init(spec, model_linear_shapes(model_dir), cfg.seed)
    final = _replay(initial, records, 40)
    master = engine_fp32.master()
    assert all(torch.equal(master[k], v) for k, v in final.tensors.items())
    # the slots hold the last step's θ₃₉ ± εz, written from the master, never ±ε applied in place
    last = records[-1]
    plus, minus = _replay(initial, records, 39).variants([(last["seed"], cfg.eps), (last["seed"], -cfg.eps)])
    for slot, expected in enumerate((plus, minus)):
        held = engine_fp32.slot_tensors(slot)
        assert set(held) == set(expected)
        for k, v in expected.items():
            assert torch.equal(held[k], v * spec.scaling if "lora_B" in k else v), (slot, k)
    assert any(not torch.equal(final.tensors[k], v) for k, v in initial.tensors.items())


# ----------------------------------------------------------------------------- 5. edge cases


def test_g_is_finite_for_every_eps(engine_fp32, loaded, sst2_batch, gradient):
    dataset, requests = sst2_batch
    exact = {s: directional_derivative(gradient, s) for s in SEEDS[:2]}
    rows = V.eps_sweep(engine_fp32, dataset, requests, exact)
    assert [r["eps"] for r in rows] == list(V.EPS_SWEEP)
    assert all(r["all_finite"] for r in rows), rows
    by_eps = {r["eps"]: r["max_rel_err"] for r in rows}
    assert by_eps[1e-3] < V.GRAD_TOL
    assert by_eps[1e-10] > 10 * by_eps[1e-3]  # fp32 rounding takes over at small ε, as reported
    # README: "smallest error at ε = 1e-3", "fp32 rounding above 1% for ε ≤ 1e-5"
    median = {r["eps"]: r["median_rel_err"] for r in rows}
    assert min(median, key=median.get) == 1e-3, median
    assert all(median[e] > V.GRAD_TOL for e in median if e <= 1e-5), median


def test_loss_that_does_not_depend_on_the_adapter_gives_zero(engine_fp32, model_dir, sst2_batch, loaded):
    _, requests = sst2_batch
    shapes = model_linear_shapes(model_dir)
    gs = V.adapter_independent_g(engine_fp32, loaded, shapes, requests, SEEDS)
    assert gs == [0.0] * 5  # README: "g = 0.0 exactly, 5 seeds"
    # not vacuous: the same first-token requests do depend on a v_proj LoRA
    reqs = V.query_only_requests(requests)
    dataset = Dataset("first", COMPLETION, tuple(Example("", ("",), None) for _ in reqs))
    assert V.g_of(engine_fp32, dataset, reqs, SEEDS[0], 1e-2) != 0.0


# A bf16 engine in a process of its own, trained by `tune` for a few steps; afterwards it prints
# the dtypes its worker holds (the master, engine.master(), and a LoRA slot), how many entries of
# the master moved by less than bf16 can resolve at their size (a bf16 master would have lost
# them), and the log-prob sums of dev requests before training.
_BF16_RUN = r"""
import json, sys
import torch
from mezo_vllm.adapter import LoraAdapter, LoraSpec, model_linear_shapes
from mezo_vllm.config import TuneConfig
from mezo_vllm.data import Split, load_task
from mezo_vllm.engine import EngineConfig, VllmEngine
from mezo_vllm.model import prepare_default_model
from mezo_vllm.trainer import tune

model = str(prepare_default_model())
cfg = TuneConfig(out=sys.argv[1], task="sst2", dtype="bfloat16", steps=2, batch_size=4, directions=1, eval_every=0,
                 save_every=0, eval_examples=int(sys.argv[2]))
init = LoraAdapter.init(LoraSpec(), model_linear_shapes(model), seed=cfg.seed)
engine = VllmEngine(EngineConfig(model=model, dtype="bfloat16"), init)
dev = Split.make(load_task("sst2").dev, engine.tokenizer, cfg.max_length, cfg.overflow).first(cfg.eval_examples)
engine.write_variants([(0, 0.0)])
before = engine.score(dev.requests, [0])[0].tolist()
tune(cfg, engine=engine)
master = engine.master()
below = 0
for name, value in master.items():
    moved = (value - init.tensors[name]).abs()
    spacing = torch.finfo(torch.bfloat16).eps * init.tensors[name].abs()
    below += int(((moved > 0) & (moved < spacing / 2)).sum())
print(json.dumps({"master": sorted({str(v.dtype) for v in master.values()}),
                  "slot": sorted({str(v.dtype) for v in engine.slot_tensors(0).values()}),
                  "below_bf16_resolution": below, "before": before}))
"""


@pytest.mark.slow
def test_bf16_engine_keeps_an_fp32_master_and_agrees_with_fp32(tmp_path, engine_fp32, initial_adapter, tokenizer):
    """A bf16 engine (its own process; bf16 matmuls are slow on CPUs without AMX, so 2 steps of
    4 examples): its worker holds the master in fp32 and keeps updates too small for bf16, vLLM's
    slot holds the bf16 variant, its steps are finite, and its log-probs before training are the
    fp32 engine's within bf16's rounding."""
    run, n_dev = tmp_path / "bf16", 8
    result = subprocess.run([sys.executable, "-c", _BF16_RUN, str(run), str(n_dev)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    held = json.loads(result.stdout.strip().splitlines()[-1])
    assert held["master"] == ["torch.float32"] and held["slot"] == ["torch.bfloat16"], held
    assert held["below_bf16_resolution"] > 0, held
    records = _records(run)
    assert len(records) == 2 and all(math.isfinite(r["loss_plus"]) and math.isfinite(r["loss_minus"])
                                     for r in records)
    cfg = TuneConfig(out=str(tmp_path / "unused"), task="sst2")
    dev = Split.make(load_task("sst2").dev, tokenizer, cfg.max_length, cfg.overflow).first(n_dev)
    engine_fp32.load_master(initial_adapter)
    engine_fp32.write_variants([(0, 0.0)])
    fp32 = engine_fp32.score(dev.requests, [0])[0]
    bf16 = np.asarray(held["before"])
    assert bf16.shape == fp32.shape
    assert np.mean(np.abs(bf16 - fp32)) < 0.03 * np.mean(np.abs(fp32)), (bf16[:6], fp32[:6])
    assert np.corrcoef(bf16.ravel(), fp32.ravel())[0, 1] > 0.99


# ----------------------------------------------------------------------------- 6. prefix sharing


def test_shared_prefix_cache_reads_change_no_loss(engine_fp32, loaded, mixed):
    for dataset, requests in mixed:
        result = V.prefix_sharing_agreement(engine_fp32, dataset, requests, seed=1)
        # 0.0 on validate's batch; here up to ~4e-6, GEMM rounding following the batch's shape
        assert result["max_loss_diff"] < V.SHARE_TOL, (dataset.name, result)


def test_reusing_the_plus_pass_prompt_kv_biases_g(reference, loaded, sst2_batch, gradient):
    """What the SGLang integration did, emulated: its g stays wrong as ε shrinks; exact g does not."""
    dataset, requests = sst2_batch
    exact = {s: directional_derivative(gradient, s) for s in SEEDS[:2]}
    rows = V.kv_reuse_error(reference, dataset, requests, exact)
    for r in rows:
        assert r["rel_err_reuse"] > 0.1, r  # README: "off by more than 10%" (its size depends on the batch)
        if r["eps"] == 1e-3:
            assert r["rel_err_exact"] < V.GRAD_TOL, r


def test_the_benchmarks_peft_loop_takes_the_engines_steps(engine_fp32, model_dir, tokenizer, sst2_batch):
    """bench's baseline (`baseline.PeftMezoLoop`, batched and padded) from the engine's initial
    adapter with the engine's z: two MeZO steps give the engine's L+ and L− (fp32 sums in
    another order), so the benchmark compares the same work and its loss gap checks the engine."""
    from mezo_vllm.baseline import PeftMezoLoop
    from mezo_vllm.trainer import mezo_step

    dataset, requests = sst2_batch
    initial = V.random_adapter(LoraSpec(), model_linear_shapes(model_dir))
    loop = PeftMezoLoop(model_dir, "float32", initial)
    engine_fp32.load_master(initial)
    split = Split.make(dataset, tokenizer, 1024, "truncate")
    for seed in (7, 8):
        ours = mezo_step(engine_fp32, split, split.requests, [seed], 1e-2, ZOSGD(), 1e-2).losses
        theirs = loop.step(dataset, requests, seed, 1e-2, 1e-2)
        assert ours == pytest.approx(list(theirs), abs=2e-5), (seed, ours, theirs)
    assert abs(ours[0] - ours[1]) > 1e-4  # the directions move the loss: the check has teeth
