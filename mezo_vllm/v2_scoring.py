"""Scoring on vLLM's Model Runner V2 with vLLM's own API: no patch on the model runner.

Why: V2 (the CUDA default, `platform_policy.runner_is_v2`) never calls the V1 method that
`patches/span_logprobs.py` wraps, but it scores given token ids at given prompt rows natively
(vLLM 0.32.0, paths relative to the `vllm` package):

- `SamplingParams(prompt_logprob_token_ids=[rows, cols], prompt_logprob_start=s)`: prompt row
  s + i scores row i's ids as predictions of prompt token s + i + 1 (sampling_params.py:350-359);
  -1 pads a row. The input processor insists on rows == prompt_len - 1 - s
  (v1/engine/input_processor.py:464-475) and `verify` on cols ≤ the engine's `max_logprobs`
  (sampling_params.py:1004-1012, default 20: start the engine with `max_logprobs` ≥
  `max_columns(requests)`).
- `PromptLogprobsWorker.compute_prompt_token_id_logprobs` (v1/worker/gpu/sample/prompt_logprob.py:
  69-118) runs the lm_head on rows s .. prompt_len-2 only, chunk by chunk of a chunked prefill,
  takes log-softmax values at the ids (`compute_token_logprobs`, a Triton kernel that never
  materialises the full-vocabulary log-probs), writes -inf in padded columns and emits the
  float32 [rows, cols] tensor when the prompt's last chunk ran. It reaches
  `RequestOutput.prompt_token_id_logprobs` as a numpy array (v1/worker/gpu/async_utils.py:159-162,
  v1/core/sched/scheduler.py:2260-2271, v1/engine/logprobs.py:365-366,
  v1/engine/output_processor.py:405-418).

So a request whose first target token is at `span_start` asks from s = span_start - 1, and has
rows = len(token_ids) - span_start. Its prompt is the whole `token_ids`: V2 never scores the
last prompt row (prompt_logprob.py:101-103), so the V1 path's `token_ids[:-1]` would lose the
last target token.

Where rows go missing, and what this module does about it:
- A prefix-cache hit that starts the prefill past s: the worker drops the request without a
  word (prompt_logprob.py:93-99) and the output has no scores. Such requests skip the prefix
  cache unless told otherwise (`skip_reading_prefix_cache` defaults to True with
  `prompt_logprob_token_ids`, sampling_params.py:622-629; read in v1/request.py:232,314-325 and
  v1/core/kv_cache_manager.py:249-251). A request that reads the cache must have its hit capped
  at ≤ s (`first_scored_row`, for patches/prefix_sharing.py). `parse_outputs` fails loudly on
  a missing result and names the cache hit when it was one.
- Preemption: the runner forgets a preempted request and re-adds it from scratch
  (v1/worker/gpu/model_runner.py:1134-1163), so its rows are computed again: nothing to do.
- `logprobs_mode` "raw_logits"/"processed_logits" returns logits, not log-probs
  (prompt_logprob.py:79,110-113): a positive value is refused.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

PAD = -1  # vLLM's padding id in prompt_logprob_token_ids (scores -inf)
LOGPROB_SLACK = 1e-4  # a float32 log-softmax value above this is not a log-prob


class ScoringError(RuntimeError):
    """A V2 scoring result that is missing, the wrong shape, or not log-probs."""


class ScoringRequest(Protocol):
    """A prompt and the token ids to score at each target position (data.Request, issue 11)."""

    token_ids: Sequence[int]
    span_start: int  # index in token_ids of the first target token
    # One row per target position (len(token_ids) - span_start rows); column 0 is the token
    # of token_ids at that position, further columns are alternatives (merged options).
    candidates: Sequence[Sequence[int]]


def candidate_matrix(request: ScoringRequest) -> np.ndarray:
    """The request's candidates as vLLM's int64 [rows, cols] array, short rows padded with PAD.

    Raises ScoringError for a request whose rows do not line up with its tokens: vLLM would
    refuse some of these and silently score others at the wrong position.
    """
    ids, start, rows = request.token_ids, request.span_start, request.candidates
    if not 1 <= start < len(ids):
        raise ScoringError(f"span_start {start} outside 1..{len(ids) - 1} (prompt of {len(ids)} tokens)")
    if len(rows) != len(ids) - start:
        raise ScoringError(f"{len(rows)} candidate rows for {len(ids) - start} target tokens "
                           f"(len(token_ids) - span_start)")
    cols = max(len(row) for row in rows)
    matrix = np.full((len(rows), cols), PAD, dtype=np.int64)
    for i, row in enumerate(rows):
        if not row or row[0] != ids[start + i]:
            raise ScoringError(f"candidate row {i} must start with the target token "
                               f"{ids[start + i]} (token_ids[{start + i}]), got {list(row)[:3]}")
        if min(row) < 0:
            raise ScoringError(f"candidate row {i} has a negative token id: {list(row)}")
        matrix[i, : len(row)] = row
    return matrix


def max_columns(requests: Sequence[ScoringRequest]) -> int:
    """The widest candidate row: the engine's `max_logprobs` must be at least this."""
    return max((len(row) for r in requests for row in r.candidates), default=0)


def sampling_params(requests: Sequence[ScoringRequest], *, read_prefix_cache: bool = False) -> list[Any]:
    """One V2 scoring `SamplingParams` per request: one greedy token, no detokenizing.

    `read_prefix_cache=True` lets the request read the prefix cache; only safe with a cap that
    keeps every hit at or below `first_scored_row` (patches/prefix_sharing.py).
    """
    from vllm import SamplingParams

    return [
        SamplingParams(
            max_tokens=1,
            temperature=0.0,
            detokenize=False,
            prompt_logprob_token_ids=candidate_matrix(r),
            prompt_logprob_start=r.span_start - 1,
            skip_reading_prefix_cache=not read_prefix_cache,
        )
        for r in requests
    ]


def first_scored_row(params: Any) -> int | None:
    """The first prompt row a V2 scoring request scores, None for any other request.

    A prefix-cache hit of h tokens starts the prefill at row h: h must not exceed this row.
    """
    if getattr(params, "prompt_logprob_token_ids", None) is None:
        return None
    return params.prompt_logprob_start or 0


def parse_outputs(outputs: Sequence[Any], requests: Sequence[ScoringRequest]) -> list[np.ndarray]:
    """Each request's log-probs as float64 [rows, cols] (-inf in padded columns), from the
    `RequestOutput`s of one `LLM.generate` call, in request order. Raises ScoringError for a
    missing result, a wrong shape, NaN, -inf in a real column, or a value that is no log-prob."""
    if len(outputs) != len(requests):
        raise ScoringError(f"{len(outputs)} outputs for {len(requests)} requests")
    return [_parse_one(i, out, r) for i, (out, r) in enumerate(zip(outputs, requests))]


def _parse_one(i: int, output: Any, request: ScoringRequest) -> np.ndarray:
    expected = candidate_matrix(request)
    scores = getattr(output, "prompt_token_id_logprobs", None)
    if scores is None:
        raise ScoringError(f"request {i}: no prompt_token_id_logprobs came back{_why_missing(output, request)}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != expected.shape:
        raise ScoringError(f"request {i}: log-probs of shape {scores.shape}, expected {expected.shape} "
                           "(rows = len(token_ids) - span_start, one column per candidate)")
    real = expected != PAD
    if np.isnan(scores).any():
        rows = sorted(set(np.nonzero(np.isnan(scores))[0].tolist()))
        raise ScoringError(f"request {i}: NaN log-probs at rows {rows[:5]}")
    bad = real & ~np.isfinite(scores)
    if bad.any():
        rows = sorted(set(np.nonzero(bad)[0].tolist()))
        raise ScoringError(f"request {i}: infinite log-prob of a candidate token at rows {rows[:5]}")
    if not np.all(scores[~real] == -np.inf):
        raise ScoringError(f"request {i}: a padded column holds a value, not -inf (columns out of order?)")
    if scores[real].max(initial=-np.inf) > LOGPROB_SLACK:
        raise ScoringError(f"request {i}: positive log-prob {scores[real].max():.3g}: the engine returns "
                           "logits, not log-probs (start it with logprobs_mode='raw_logprobs')")
    return scores


def _why_missing(output: Any, request: ScoringRequest) -> str:
    cached = getattr(output, "num_cached_tokens", None) or 0
    first = request.span_start - 1
    if cached > first:
        return (f" (a prefix-cache hit of {cached} tokens started past the first scored row {first}: "
                "vLLM drops such a request; cap the cache read at the span)")
    return " (the runner emitted no scores for it: an aborted request?)"
