"""mezo_vllm/patches/span_logprobs: target-span log-probs equal upstream's prompt log-probs and transformers.

The unit tests drive the patch's step hook with a fake runner (chunk accounting, per-row lm_head
LoRA slots); the engine tests use the session's fp32 engine (`engine_fp32`, fast=True).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch


from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from mezo_vllm.data import Request
from mezo_vllm.patches import (
    lora_prompt_logprobs,
    span_logprobs,
)

VOCAB, HIDDEN = 50, 16


@pytest.fixture(scope="module", autouse=True)
def patched():
    span_logprobs.apply()


# --------------------------------------------------------------------------- no engine


@pytest.mark.parametrize("length,span_start", [(2, 1), (9, 1), (9, 8), (30, 12), (30, 29)])
def test_chunks_cover_each_span_row_once(length, span_start):
    """Any chunking of a prompt (prefix-cache hits below the span included) computes every
    span row exactly once, and nothing else."""
    rng = np.random.default_rng(length * 100 + span_start)
    for _ in range(50):
        cached = int(rng.integers(0, span_start))  # a hit ends at or below span_start-1
        cuts = np.sort(rng.choice(np.arange(cached + 1, length), size=min(3, length - cached - 1), replace=False))
        bounds = [cached, *cuts.tolist(), length]
        seen: list[int] = []
        for c0, c1 in zip(bounds, bounds[1:]):
            lo, hi = span_logprobs.chunk_span_rows(c0, c1 - c0, span_start, length - span_start)
            seen.extend(range(lo, hi))
        assert seen == list(range(span_start - 1, length - 1))


class FakeRunner:
    """What the hook reads from a GPUModelRunner: requests, batch layout, compute_logits."""

    def __init__(self, head: torch.Tensor):
        self.requests: dict[str, SimpleNamespace] = {}
        self.head = head
        self.calls: list[torch.Tensor] = []
        self.model = SimpleNamespace(compute_logits=self.compute_logits)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = lora_prompt_logprobs._rows.get()
        assert isinstance(rows, torch.Tensor) and rows.shape[0] == hidden.shape[0]
        self.calls.append(rows.clone())
        return hidden @ self.head.T

    def add(self, req_id: str, ids: list[int], span: tuple[int, int] | None,
            candidates: list[list[int]] | None = None) -> None:
        if span is not None and candidates is None:  # the prompt's own next tokens
            candidates = [[t] for t in ids[span[0]:]]
        params = None if span is None else span_logprobs.span_params(*span, candidates)
        self.requests[req_id] = SimpleNamespace(
            prompt_token_ids=ids, sampling_params=params, num_computed_tokens=0
        )

    def step(self, scheduled: dict[str, int], states: dict[str, torch.Tensor]) -> None:
        """Run one step: `scheduled` tokens of each request, their hidden states from `states`."""
        order = list(scheduled)
        self.input_batch = SimpleNamespace(req_id_to_index={r: i for i, r in enumerate(order)})
        starts = np.cumsum([0] + [scheduled[r] for r in order])
        self.query_start_loc = SimpleNamespace(np=starts)
        hidden = torch.cat([
            states[r][self.requests[r].num_computed_tokens :][: scheduled[r]] for r in order
        ])
        span_logprobs.score_step(self, hidden, scheduled)
        for r in order:
            self.requests[r].num_computed_tokens += scheduled[r]


def by_hand(head: torch.Tensor, states: torch.Tensor, ids: list[int], span_start: int) -> np.ndarray:
    logprobs = torch.log_softmax(states @ head.T, dim=-1, dtype=torch.float32)
    rows = range(span_start - 1, len(ids) - 1)
    return np.array([logprobs[i, ids[i + 1]].item() for i in rows])


def test_step_hook_accumulates_chunks_across_requests():
    g = torch.Generator().manual_seed(0)
    head = torch.randn(VOCAB, HIDDEN, generator=g)
    runner = FakeRunner(head)
    specs = {"a": (12, 5), "b": (7, 6), "c": (20, 1), "plain": (9, None)}  # length, span start
    ids, states = {}, {}
    for key, (req_id, (length, start)) in enumerate(specs.items()):
        ids[req_id] = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        states[req_id] = torch.randn(length, HIDDEN, generator=g)
        runner.add(req_id, ids[req_id], None if start is None else (start, key))
    runner.step({"a": 8, "b": 7, "c": 3, "plain": 9}, states)  # a: rows 4..7 of 4..10
    runner.step({"a": 4, "c": 10}, states)
    runner.step({"c": 7}, states)
    assert len(runner.calls) == 3  # one lm_head call per step, all requests' rows together
    got = span_logprobs.take_from(runner)
    assert sorted(got) == [0, 1, 2]  # the request without a span is not scored
    for key, req_id in enumerate(["a", "b", "c"]):
        expected = by_hand(head, states[req_id], ids[req_id], specs[req_id][1])
        assert got[key].shape == (len(expected), 1)
        np.testing.assert_allclose(got[key][:, 0], expected, rtol=1e-6, atol=1e-6)
    assert span_logprobs.take_from(runner) == {}  # take() forgets


def test_candidates_score_several_ids_per_row_across_chunks():
    """CANDIDATES ([rows][columns], V2's prompt_logprob_token_ids shape) gives each row the
    log-probs of its listed ids, also when a chunk boundary falls inside the span, and the
    rows may include the prompt's last position (whose logits upstream computes only to sample)."""
    g = torch.Generator().manual_seed(1)
    head = torch.randn(VOCAB, HIDDEN, generator=g)
    runner = FakeRunner(head)
    ids = torch.randint(0, VOCAB, (10,), generator=g).tolist()
    states = {"m": torch.randn(10, HIDDEN, generator=g), "last": torch.randn(6, HIDDEN, generator=g)}
    candidates = [[ids[r + 1], 3, 7] for r in range(5, 9)]  # span start 6: rows 5..8
    runner.add("m", ids, (6, 0), candidates)
    runner.add("last", ids[:6], (6, 1), [[11, 12, 13, 14]])  # row 5: the prompt's last
    runner.step({"m": 7, "last": 6}, states)  # m: rows 5, 6 now, 7, 8 next step
    runner.step({"m": 3}, states)
    got = span_logprobs.take_from(runner)
    logprobs = torch.log_softmax(states["m"] @ head.T, dim=-1)
    expected = np.array([[logprobs[r, t].item() for t in row] for r, row in zip(range(5, 9), candidates)])
    np.testing.assert_allclose(got[0], expected, rtol=1e-6, atol=1e-6)
    last = torch.log_softmax(states["last"] @ head.T, dim=-1)[5]
    np.testing.assert_allclose(got[1], [[last[t].item() for t in (11, 12, 13, 14)]], rtol=1e-6, atol=1e-6)
    runner.add("bad", ids, (6, 2), [[1]] * 6)  # rows 5..10 of a 10-token prompt
    with pytest.raises(span_logprobs.SpanError, match="does not fit"):
        runner.step({"bad": 10}, {"bad": states["m"]})


def test_rows_never_computed_are_an_error():
    """A prompt whose computation starts inside the span (e.g. a prefix-cache hit) is caught."""
    runner = FakeRunner(torch.randn(VOCAB, HIDDEN))
    runner.add("r", list(range(10)), (4, 0))
    runner.requests["r"].num_computed_tokens = 5  # rows 3 and 4 are never computed
    runner.step({"r": 5}, {"r": torch.randn(10, HIDDEN)})
    with pytest.raises(span_logprobs.SpanError, match="never computed"):
        span_logprobs.take_from(runner)
    assert span_logprobs.take_from(runner) == {}


def test_gather_reports_lost_requests():
    values = {3: np.array([[-1.0], [-2.0]]), 4: np.array([[-0.5, -0.7]])}
    got = span_logprobs.gather([values, {}], [4, 3])
    assert [g.tolist() for g in got] == [[[-0.5, -0.7]], [[-1.0], [-2.0]]]
    with pytest.raises(span_logprobs.SpanError, match="no span log-probs"):
        span_logprobs.gather([values], [3, 5])


def test_lm_head_lora_uses_each_rows_slot():
    """`batch_rows(index tensor)`: each listed row gets its own token's slot (-1: no LoRA)."""
    slots, rank, vocab = 3, 4, 20
    token_slots = [0, 0, 0, -1, -1, 2, 2, 1, 1, 1]
    w = PunicaWrapperCPU(64, 16, "cpu")
    w._token_lora_indices[: len(token_slots)].copy_(torch.tensor(token_slots))
    w.indices_len[0] = len(token_slots)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(slots, 1, rank, HIDDEN, generator=g)
    b = torch.randn(slots, 1, vocab, rank, generator=g)
    rows = torch.tensor([9, 1, 3, 5])  # not contiguous, not sorted
    x = torch.randn(len(rows), HIDDEN, generator=g)
    y = torch.randn(len(rows), vocab, generator=g)
    expected = y.clone()
    for i, r in enumerate(rows.tolist()):
        s = token_slots[r]
        if s >= 0:
            expected[i] += 0.5 * (x[i] @ a[s, 0].T) @ b[s, 0].T
    with lora_prompt_logprobs.batch_rows(rows):
        w.add_lora_logits(y, x, a, b, 0.5)
    torch.testing.assert_close(y, expected)


def test_apply_is_idempotent():
    method = GPUModelRunner._get_prompt_logprobs_dict
    span_logprobs.apply()
    assert GPUModelRunner._get_prompt_logprobs_dict is method
    assert method.__module__ == span_logprobs.__name__
    assert getattr(GPUModelRunner, f"_mezo_vllm_patch_{span_logprobs.NAME}") is True


# --------------------------------------------------------------------------- engine


def mixed_batch(n: int = 12, seed: int = 0) -> list[Request]:
    """Different lengths, span lengths 1..20 (both ends included)."""
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        span = 1 if i == 0 else 20 if i == 1 else int(rng.integers(1, 21))
        length = int(rng.integers(span + 2, 90))
        ids = tuple(int(t) for t in rng.integers(10, 40000, length))
        reqs.append(Request(i, 0, ids, length - span))
    return reqs


def test_spans_equal_prompt_logprobs(engine_fp32, initial_adapter):
    assert engine_fp32.config.fast
    engine_fp32.load_master(initial_adapter)
    engine_fp32.write_variants([(7, 0.5), (7, -0.5)])
    reqs, variants = mixed_batch(), [None, 0, 1]
    spans = engine_fp32.score(reqs, variants)
    upstream = engine_fp32._score_prompt_logprobs(reqs, engine_fp32._variant_loras(variants))
    np.testing.assert_allclose(spans, upstream, rtol=0, atol=1e-4)
    assert np.abs(spans[1] - spans[2]).max() > 1e-2  # the variants differ


def test_spans_equal_transformers(engine_fp32, model_dir):
    from transformers import AutoModelForCausalLM

    reqs = mixed_batch(seed=1)
    spans = engine_fp32.score(reqs, [None])[0]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for r in reqs:
            logits = model(input_ids=torch.tensor([r.token_ids])).logits[0]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            rows = torch.arange(r.span_start - 1, len(r.token_ids) - 1)
            expected.append(logprobs[rows, torch.tensor(r.token_ids)[rows + 1]].sum().item())
    np.testing.assert_allclose(spans, expected, rtol=0, atol=1e-4)


def test_chunked_prefill(engine_fp32, initial_adapter, monkeypatch):
    """Prompts that do not fit one step's token budget together: the scheduler splits some of
    them across steps, a span included; scores equal those of each prompt scored alone."""
    config = engine_fp32.llm.llm_engine.vllm_config
    budget = config.scheduler_config.max_num_batched_tokens
    assert config.scheduler_config.enable_chunked_prefill
    engine_fp32.load_master(initial_adapter)
    engine_fp32.write_variants([(7, 0.5), (7, -0.5)])
    longest = min(engine_fp32.max_model_len - 8, 1000)
    # Fill the budget but for `longest - 10` tokens: the last prompt's span (20 tokens) is cut.
    lengths, room = [], budget - (longest - 10)
    while room > 0:
        lengths.append(min(longest, room))
        room -= lengths[-1]
    lengths.append(longest)
    rng = np.random.default_rng(5)
    reqs = [
        Request(i, 0, tuple(int(t) for t in rng.integers(10, 40000, n)), n - 20)
        for i, n in enumerate(lengths)
    ]
    chunks: list[tuple[int, int, int, int]] = []
    original = span_logprobs.chunk_span_rows

    def recording(c0, n, start, rows):
        chunks.append((c0, n, start, rows))
        return original(c0, n, start, rows)

    monkeypatch.setattr(span_logprobs, "chunk_span_rows", recording)
    loras = engine_fp32._variant_loras([0])
    together = engine_fp32._score_spans(reqs, loras, share_prefix=False)[0]
    assert any(s - 1 < c0 + n < s - 1 + rows for c0, n, s, rows in chunks), "no span was split"
    for i in (0, len(reqs) - 1):  # one scored whole, the one whose span was split
        alone = engine_fp32._score_spans([reqs[i]], loras, share_prefix=False)[0, 0]
        np.testing.assert_allclose(together[i], alone, rtol=1e-5, atol=1e-4)  # sums of ~-400: fp32 rounding
