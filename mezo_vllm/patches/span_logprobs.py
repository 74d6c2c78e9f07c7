"""Target-span log-probs: log p(token) for the target span of a prompt only (vLLM 0.32.0).

Upstream: the only way to score a prompt on the V1 runner is `prompt_logprobs=0`.
`GPUModelRunner._get_prompt_logprobs_dict` then runs, request by request, the lm_head and a
full-vocabulary log_softmax over *every* prompt position, builds `LogprobsTensors` for the whole
prompt, and the output processor turns them into one dict per position. MeZO only needs the
summed log-prob of a short target span at the end of the prompt: for SmolLM2-135M this work is
~22% of a bf16 scoring call. Such requests also never read the prefix cache
(`SamplingParams.skip_reading_prefix_cache` defaults to True with prompt log-probs), because
cached positions get no log-prob. (V2's `prompt_logprob_start` does suffix-only scoring, but V2
needs Triton, so it does not run on CPU.)

Change: a request marks its span with `SamplingParams.extra_args` (`span_params()` builds the
params: `{START: index of the first target token, KEY: a caller's id, CANDIDATES: the token ids
to score at each span row}`, no prompt log-probs, one greedy token, no detokenization).
CANDIDATES is a [rows][columns] list, the shape of V2's `prompt_logprob_token_ids`: row i is
prompt position START-1+i and scores its ids as predictions of the token after it. The rows
may run to the prompt's *last* position, whose logits upstream computes only for sampling:
the caller sends a span without its last token (that token is never needed as input, only as
a candidate), so a request of n target tokens costs n-1 prompt tokens fewer than a prompt
that spells the whole span; and several ids per row let one request score several options
that differ in their last token (SST-2's " negative"/" positive" from one forward pass).

After each model step, the wrapped `_get_prompt_logprobs_dict` collects, for every scheduled
request with a span, the span rows that this step computed (with chunked prefill a prompt spans
several steps, each from `request.num_computed_tokens`), runs the lm_head once over all those
rows of all requests (per `MAX_ROWS` rows; with each row's own lm_head LoRA slot, via
`lora_prompt_logprobs.batch_rows`), takes an fp32 log_softmax as upstream does
(`Sampler.compute_logprobs`) and gathers each row's candidate ids. (The sampler still computes
the logits of each request's last position for its one generated token, as for any request.)
The values land in a per-runner dict keyed by the caller's id, one [rows, columns] array per
request: a row computed again (a preempted request recomputes its prompt) overwrites its values,
and a row never computed stays NaN, which `take_from()` reports as an error (e.g. a prefix cache
hit that covered span rows). The caller fetches and clears the dict with `take_from` after
`generate` (`worker.MezoWorkerExtension.mezo_take_spans`; ranks that compute no logits, pipeline
stages before the last, store nothing). Requests without the mark take upstream's path
unchanged; `logprobs_mode` is ignored for span rows (always normalised log-probs).

Keying by the caller's id, not by the request id, keeps the caller independent of how vLLM
renames requests: `InputProcessor.assign_request_id` makes the runner's id
`f"{LLM-level id}-{8 random chars}"` (unless `VLLM_DISABLE_REQUEST_ID_RANDOMIZATION`).

Written for vLLM 0.32.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from . import check_version, lora_prompt_logprobs, mark_applied, PLATFORMS, Scope

SUPPORTED = ("0.32.0",)
NAME = "span_logprobs"
SCOPE = Scope(  # V2's runner is no subclass of V1's and scores prompts natively (v2_scoring)
    targets=("vllm.v1.worker.gpu_model_runner:GPUModelRunner._get_prompt_logprobs_dict",),
    platforms=PLATFORMS, runners=("v1",),
)

START = "mezo_span_start"  # extra_args: index in the prompt of the first target token
KEY = "mezo_span_key"  # extra_args: the caller's id for the request's result
CANDIDATES = "mezo_span_candidates"  # extra_args: [rows][columns] token ids to score
MAX_ROWS = 1024  # span rows per lm_head call: bounds the [rows, vocab] fp32 log-prob buffer


class SpanError(RuntimeError):
    """A span request whose target rows were not all computed (or a malformed span)."""


def span_params(span_start: int, key: int, candidates: list[list[int]], *,
                read_prefix_cache: bool = False) -> Any:
    """SamplingParams for a span request: one greedy token, no prompt log-probs, no detokenizing.

    `candidates`: the token ids to score at each span row, [rows][columns]. The prefix cache is
    not read by default: a cached prefix must never cover span rows (they would not be
    computed). `prefix_sharing` reads it with the hit capped below the span.
    """
    from vllm import SamplingParams

    extra = {START: int(span_start), KEY: int(key), CANDIDATES: candidates}
    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        detokenize=False,
        skip_reading_prefix_cache=not read_prefix_cache,
        extra_args=extra,
    )


def span_of(sampling_params: Any) -> tuple[int, int] | None:
    """(span start, key) of a span request's SamplingParams, None for any other request."""
    extra = getattr(sampling_params, "extra_args", None)
    if not extra or START not in extra:
        return None
    return extra[START], extra[KEY]


def chunk_span_rows(
    num_computed: int, num_scheduled: int, span_start: int, num_rows: int
) -> tuple[int, int]:
    """Prompt rows [lo, hi) of this step's chunk that are span rows (hi ≤ lo: none).

    The chunk computes positions num_computed .. num_computed+num_scheduled-1; the span rows
    are span_start-1 .. span_start-2+num_rows (position i's logits predict token i+1).
    """
    lo = max(num_computed, span_start - 1)
    hi = min(num_computed + num_scheduled, span_start - 1 + num_rows)
    return lo, hi


@dataclass
class _Rows:
    """This step's span rows, gathered over all span requests."""

    batch_rows: list[int]  # row of the step's hidden states
    pairs: list[tuple[int, int]]  # (index into batch_rows, token id) of every value wanted
    # (key, span length, columns, first row, rows), in order: their values follow `pairs`
    dest: list[tuple[int, int, int, int, int]]


def _collect(runner: Any, num_scheduled_tokens: dict[str, int]) -> _Rows:
    rows = _Rows([], [], [])
    query_start = runner.query_start_loc.np
    index_of = runner.input_batch.req_id_to_index
    for req_id, n in num_scheduled_tokens.items():
        request = runner.requests.get(req_id)
        span = None if request is None else span_of(request.sampling_params)
        if span is None:
            continue
        start, key = span
        ids = request.prompt_token_ids
        candidates = request.sampling_params.extra_args.get(CANDIDATES)
        if ids is None or not candidates or not 1 <= start <= start - 1 + len(candidates) <= len(ids):
            raise SpanError(f"a span of {len(candidates or ())} rows from position {start - 1} does not fit "
                            f"a prompt of {0 if ids is None else len(ids)} tokens")
        width = len(candidates[0])
        c0 = request.num_computed_tokens
        lo, hi = chunk_span_rows(c0, n, start, len(candidates))
        # A chunk without span rows still registers the request: a span whose rows are all
        # missing must be reported, not lost.
        count = max(hi - lo, 0)
        rows.dest.append((key, len(candidates), width, lo - (start - 1), count))
        if count:
            first = int(query_start[index_of[req_id]]) + lo - c0
            for row in range(lo, hi):
                rows.pairs.extend((len(rows.batch_rows), token) for token in candidates[row - (start - 1)])
                rows.batch_rows.append(first + row - lo)
    return rows


def span_logprobs(
    compute_logits: Any, hidden_states: torch.Tensor, batch_rows: list[int],
    pairs: list[tuple[int, int]], max_rows: int = MAX_ROWS,
) -> np.ndarray | None:
    """log p(token | row) of each (index into batch_rows, token) pair, fp32 log_softmax over the
    full vocabulary (float64 out); pairs come grouped by row, in row order.

    One `compute_logits` call per `max_rows` rows, each told which batch rows it covers. None
    where this rank computes no logits (not the last pipeline stage).
    """
    out = np.empty(len(pairs), dtype=np.float64)
    device = hidden_states.device
    of_row = torch.tensor([row for row, _ in pairs], dtype=torch.long)
    tokens = torch.tensor([token for _, token in pairs], dtype=torch.long, device=device)
    bounds = torch.searchsorted(of_row, torch.arange(0, len(batch_rows) + max_rows, max_rows)).tolist()
    for k, s in enumerate(range(0, len(batch_rows), max_rows)):
        idx = torch.tensor(batch_rows[s : s + max_rows], dtype=torch.long, device=device)
        with lora_prompt_logprobs.batch_rows(idx):
            logits = compute_logits(hidden_states.index_select(0, idx))
        if logits is None:
            return None
        logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
        lo, hi = bounds[k], bounds[k + 1]
        picked = logprobs[(of_row[lo:hi] - s).to(device), tokens[lo:hi]]
        out[lo:hi] = picked.double().cpu().numpy()
    return out


def _store_of(runner: Any) -> dict[int, np.ndarray]:
    store = getattr(runner, "_mezo_span_logprobs", None)
    if store is None:
        store = runner._mezo_span_logprobs = {}
    return store


def score_step(runner: Any, hidden_states: torch.Tensor, num_scheduled_tokens: dict[str, int]) -> None:
    """Compute and store the span log-probs of this step's chunk of every span request."""
    rows = _collect(runner, num_scheduled_tokens)
    if not rows.dest:
        return
    values = np.empty(0)
    if rows.batch_rows:
        values = span_logprobs(
            runner.model.compute_logits, hidden_states, rows.batch_rows, rows.pairs
        )
        if values is None:
            return
    store = _store_of(runner)
    at = 0
    for key, length, width, first, count in rows.dest:
        dest = store.get(key)
        if dest is None:
            dest = store[key] = np.full((length, width), np.nan)
        dest[first : first + count] = values[at : at + count * width].reshape(count, width)
        at += count * width


def take_from(runner: Any) -> dict[int, np.ndarray]:
    """The [rows, columns] log-probs of every span request since the last call, by key, and
    forget them. Raises SpanError if a target token's row was never computed."""
    store = _store_of(runner)
    runner._mezo_span_logprobs = {}
    missing = [key for key, values in store.items() if np.isnan(values).any()]
    if missing:
        raise SpanError(
            f"{len(missing)} span request(s) (keys {missing[:3]}) have target tokens whose "
            "log-prob was never computed (a prefix-cache hit over the span, or an aborted request)"
        )
    return store


def gather(results: Iterable[dict[int, np.ndarray]], keys: Iterable[int]) -> list[np.ndarray]:
    """The [rows, columns] log-probs of each key, from the first worker that has it."""
    merged: dict[int, np.ndarray] = {}
    for result in results:
        for key, values in result.items():
            merged.setdefault(key, values)
    keys = list(keys)
    lost = [k for k in keys if k not in merged]
    if lost:
        raise SpanError(f"no span log-probs came back for {len(lost)} request(s) (keys {lost[:3]})")
    return [merged[k] for k in keys]


def _wrap(original: Any) -> Any:
    def _get_prompt_logprobs_dict(
        self: Any, hidden_states: torch.Tensor, num_scheduled_tokens: dict[str, int], *args: Any,
        **kwargs: Any,
    ):
        score_step(self, hidden_states, num_scheduled_tokens)
        return original(self, hidden_states, num_scheduled_tokens, *args, **kwargs)

    return _get_prompt_logprobs_dict


def apply() -> None:
    check_version(NAME, SUPPORTED)
    lora_prompt_logprobs.apply()  # per-row lm_head LoRA slots for `batch_rows`
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if mark_applied(GPUModelRunner, NAME):
        GPUModelRunner._get_prompt_logprobs_dict = _wrap(GPUModelRunner._get_prompt_logprobs_dict)
