"""Generation tasks: greedy answers from the engine with the adapter, F1/EM on dev and test, and
MeZO's F1 objective (−F1 of each ± variant's greedy answers, all variants in one call)."""

from __future__ import annotations

import pytest
import torch

from mezo_vllm.config import ConfigError, TuneConfig
from mezo_vllm.data import COMPLETION, Dataset, Example, Split
from mezo_vllm.estimator import ZOSGD
from mezo_vllm.evaluation import MAX_ANSWER_TOKENS, evaluate
from mezo_vllm.objective import squad_f1
from mezo_vllm.trainer import mezo_step, tune

QUESTIONS = (
    "Title: France\nContext: Paris is the capital and largest city of France.\n"
    "Question: What is the capital of France?\nAnswer:",
    "Title: Sky\nContext: On a clear day the sky looks blue because air scatters blue light the most.\n"
    "Question: What colour is the sky on a clear day?\nAnswer:",
    "Title: Spiders\nContext: Spiders are arachnids with eight legs and fangs that inject venom.\n"
    "Question: How many legs do spiders have?\nAnswer:",
)


def _split(engine, answers):
    examples = tuple(Example(q, (f" {a[0]}\n",), None, answers=tuple(a)) for q, a in zip(QUESTIONS, answers))
    return Split.make(Dataset("qa", COMPLETION, examples), engine.tokenizer, 256, "truncate")


def test_generation_f1_and_exact_match_on_a_hand_made_case(engine_fp32, initial_adapter):
    """Hand-made references, F1 worked out by hand from what this model answers greedily (fp32):
    "Paris is the capital of France." (EM 1, F1 1), "The sky on a clear day is blue because air
    scatters blue light the most." against "blue" (1 word of 12 after SQuAD's normalisation:
    F1 = 2·(1/12)·1/(1/12 + 1) = 2/13), "12" against "eight"/"8" (0)."""
    engine_fp32.load_master(initial_adapter)  # B = 0: the adapter's answers are the base model's
    split = _split(engine_fp32, [["Paris is the capital of France"], ["blue"], ["eight", "8"]])
    engine_fp32.write_variants([(0, 0.0)])
    for variant in (None, 0):
        metrics = evaluate(engine_fp32, split, variant)
        assert metrics["f1"] == pytest.approx((1.0 + 2 / 13 + 0.0) / 3)
        assert metrics["em"] == pytest.approx(1 / 3)
        assert metrics["nll"] > 0


def test_reference_engine_answers_as_vllm(engine_fp32, model_dir, initial_adapter):
    """`--objective f1 --engine reference` (and --replicas, tests/test_replicas.py) generate too:
    the reference's greedy answers for the ±εz variants are vLLM's."""
    from mezo_vllm.reference import ReferenceEngine

    reference = ReferenceEngine(model_dir, initial_adapter)
    split = _split(engine_fp32, [["Paris"], ["blue"], ["eight"]])
    contexts = [r.token_ids[: r.span_start] for r in split.requests]
    writes = [(11, 0.03), (11, -0.03)]  # answers that make sense, and differ (at ε 0.5 they are noise)
    answers = []
    for engine in (engine_fp32, reference):
        engine.load_master(initial_adapter)
        engine.write_variants(writes)
        answers.append(engine.generate(contexts, MAX_ANSWER_TOKENS, [0, 1]))
    assert answers[0] == answers[1]
    assert answers[0][0] != answers[0][1]  # not vacuous: the variants answer differently


class CountingEngine:
    """The engine, with every call into it recorded (name, variants)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        value = getattr(self.engine, name)
        if name not in ("score", "generate", "write_variants", "apply_update"):
            return value

        def call(*args, **kwargs):
            self.calls.append((name, list(args[-1]) if name in ("score", "generate") else None))
            return value(*args, **kwargs)

        return call


def test_f1_objective_scores_each_variant_in_one_call(engine_fp32, random_adapter):
    engine_fp32.load_master(random_adapter)
    split = _split(engine_fp32, [["Paris"], ["blue"], ["eight", "8"]])
    requests = split.requests
    eps, seed = 0.5, 3  # a large ε, so that the two variants answer differently somewhere
    before = engine_fp32.master()
    counting = CountingEngine(engine_fp32)
    result = mezo_step(counting, split, requests, [seed], eps, ZOSGD(), lr=0.0, objective_name="f1")
    # one write of both variants, then one generate call with both, nothing scored
    assert [name for name, _ in counting.calls] == ["write_variants", "generate", "apply_update"]
    assert counting.calls[1][1] == [0, 1]
    losses, grads = result.losses, result.grads
    engine_fp32.write_variants([(seed, eps), (seed, -eps)])
    contexts = [r.token_ids[: r.span_start] for r in requests]
    texts = engine_fp32.generate(contexts, MAX_ANSWER_TOKENS, [0, 1])
    refs = [e.answers for e in split.dataset.examples]
    assert losses == [pytest.approx(-sum(squad_f1(t, a) for t, a in zip(row, refs)) / 3) for row in texts]
    assert grads == [pytest.approx((losses[0] - losses[1]) / (2 * eps))]
    assert texts[0] != texts[1]
    after = engine_fp32.master()
    assert all((after[k] == v).all() for k, v in before.items())  # lr 0: θ unchanged


def test_tune_with_the_f1_objective(engine_fp32, tmp_path):
    """`tune --objective f1` end to end (3 steps): each step's losses are −F1 of the ± variants'
    answers, g their difference over 2ε, and the adapter the ZO-SGD replay of the trajectory."""
    import json

    from mezo_vllm.adapter import LoraAdapter, LoraSpec, model_linear_shapes

    rows = [{"prompt": q, "completion": f" {a}\n"} for q, a in zip(QUESTIONS, ("Paris", "blue", "eight"))]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TuneConfig(out=str(tmp_path / "run"), data=str(data), objective="f1", steps=3, batch_size=3, directions=1,
                     eps=0.03, lr=1e-2, lr_schedule="constant", eval_every=0, save_every=0, normalise=0)
    tune(cfg, engine=engine_fp32)
    records = [json.loads(line) for line in (tmp_path / "run/trajectory.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert -1.0 <= r["loss_plus"] <= 0.0 and -1.0 <= r["loss_minus"] <= 0.0
        assert r["g"] == pytest.approx((r["loss_plus"] - r["loss_minus"]) / (2 * cfg.eps))
    assert any(r["g"] != 0.0 for r in records)  # the variants answered differently somewhere
    replay = LoraAdapter.init(LoraSpec(), model_linear_shapes(engine_fp32.config.model), cfg.seed)
    for r in records:
        replay.apply(ZOSGD().update([r["seed"]], [r["g"]], r["lr"]))
    final = LoraAdapter.load(tmp_path / "run/adapter").tensors
    assert all(torch.equal(final[k], v) for k, v in replay.tensors.items())


def test_f1_objective_refuses_classification_data(tmp_path):
    with pytest.raises(ConfigError, match="--objective f1 scores generated answers: sst2/train is classification"):
        tune(TuneConfig(out=str(tmp_path / "run"), task="sst2", objective="f1"))
    assert not (tmp_path / "run").exists()


def test_a_request_of_the_full_length_limit_scores(engine_fp32, initial_adapter):
    """tokenize() lets a request be max_model_len tokens long (BoolQ's longest passages are);
    the engine must still score it, although vLLM counts one generated token on top."""
    from mezo_vllm.data import Request

    engine_fp32.load_master(initial_adapter)
    n = engine_fp32.max_model_len
    word = engine_fp32.tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    request = Request(0, 0, (word,) * n, span_start=n - 1)
    sums = engine_fp32.score([request], [None])
    assert sums.shape == (1, 1) and -50 < sums[0, 0] < 0
