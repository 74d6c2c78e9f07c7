"""Generation tasks: greedy answers from the engine with the adapter, F1/EM on dev and test, and
MeZO's F1 objective (−F1 of each ± variant's greedy answers, all variants in one call)."""

from __future__ import annotations

import pytest

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
    engine_fp32.load_master(initial_adapter)  # B = 0: the adapter's answers are the base model's
    contexts = [engine_fp32.tokenizer(q)["input_ids"] for q in QUESTIONS]
    said = engine_fp32.generate(contexts, MAX_ANSWER_TOKENS, [None])[0]
    assert all(s.strip() for s in said)
    # the model's own answer (EM 1), an answer sharing half its words (F1 < 1), a wrong one (0)
    words = said[1].split()
    half = " ".join(words[: max(1, len(words) // 2)] + ["zebra"])
    split = _split(engine_fp32, [[said[0]], [half], ["xylophone quartet"]])
    expected_f1 = (1.0 + squad_f1(said[1], [half]) + 0.0) / 3
    assert 0.0 < squad_f1(said[1], [half]) < 1.0
    engine_fp32.write_variants([(0, 0.0)])
    for variant in (None, 0):
        metrics = evaluate(engine_fp32, split, variant)
        assert metrics["f1"] == pytest.approx(expected_f1)
        assert metrics["em"] == pytest.approx(1 / 3)
        assert metrics["nll"] > 0


def test_f1_objective_scores_each_variant_in_one_call(engine_fp32, random_adapter):
    engine_fp32.load_master(random_adapter)
    split = _split(engine_fp32, [["Paris"], ["blue"], ["eight", "8"]])
    requests = split.requests
    eps, seed = 0.5, 3  # a large ε, so that the two variants answer differently somewhere
    before = engine_fp32.master()
    result = mezo_step(engine_fp32, split, requests, [seed], eps, ZOSGD(), lr=0.0, objective_name="f1")
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
