"""Shared prefixes for span requests: read the prefix cache, but never over the target span.

Upstream: a request with prompt log-probs never reads the prefix cache
(`SamplingParams.skip_reading_prefix_cache` defaults to True for it, and
`KVCacheManager.prefix_cache_lookup_enabled` then skips the lookup), because positions served
from the cache get no log-prob. So every option of an example, and every example after the
same few-shot demonstrations, computes the shared context again. Any other request reads the
longest cached block-aligned prefix, up to `num_tokens - 1` (`get_computed_blocks`): for a
`span_logprobs` request that could cover span rows, which would then never be computed.

How vLLM 0.32 caches: `KVCacheManager.allocate_slots` registers a request's full blocks in the
prefix cache (`cache_blocks`) when the scheduler *allocates* them, before the step runs, and
the scheduler admits waiting requests one after another, each with its own lookup. So a
request admitted later in the same step hits the blocks that an earlier request of that step
is only computing; the step still writes every layer's KV for all its tokens before that
layer's attention reads (see `GPUModelRunner._allow_microbatching`, which refuses to split
such a step in two). The first option of an example computes the shared prefix, the second
one, in the same step, reads it. Only full blocks are shared: the block size sets how much.

Change: `span_logprobs.span_params(..., read_prefix_cache=True)` lets a span request read the
cache (on V2: `v2_scoring.sampling_params(..., read_prefix_cache=True)`, whose
`prompt_logprob_start` row V2's worker drops the request past, silently); the wrapped
`KVCacheManager.get_computed_blocks` caps the hit of such a request at the last block boundary
≤ its first scored row, with upstream's `truncate_computed_blocks`, so every scored row is
computed by the request itself. Other requests are unchanged. Variants never share KV: the block hash includes the LoRA name, and mezo-vllm
gives every written variant a fresh name.

Written for vLLM 0.32.0.
"""

from __future__ import annotations

import math
from typing import Any

from .. import v2_scoring
from . import check_version, mark_applied, PLATFORMS, RUNNERS, Scope, span_logprobs

SUPPORTED = ("0.32.0",)
NAME = "prefix_sharing"
SCOPE = Scope(  # the scheduler's, the same for both runners
    targets=("vllm.v1.core.kv_cache_manager:KVCacheManager.get_computed_blocks",),
    platforms=PLATFORMS, runners=RUNNERS,
)


def capped_hit(num_hit: int, span_start: int, alignment: int) -> int:
    """The longest hit ≤ num_hit that ends on a multiple of `alignment` at or below the first
    span row (span_start - 1)."""
    cap = span_start - 1
    return num_hit if num_hit <= cap else cap - cap % alignment


def _alignment(manager: Any) -> int:
    """Token multiple every prefix-cacheable group's blocks divide (one block size, usually)."""
    sizes = [
        single.block_size
        for single, group in zip(
            manager.coordinator.single_type_managers, manager.kv_cache_config.kv_cache_groups
        )
        if group.kv_cache_spec.prefix_cacheable
    ]
    return math.lcm(*sizes) if sizes else 1


def first_scored_row(sampling_params: Any) -> int | None:
    """The first prompt row a scoring request needs computed: a span request's span_start - 1
    (V1, `span_logprobs`), V2's `prompt_logprob_start`; None for any other request."""
    span = span_logprobs.span_of(sampling_params)
    return span[0] - 1 if span is not None else v2_scoring.first_scored_row(sampling_params)


def _wrap(original: Any) -> Any:
    def get_computed_blocks(self: Any, request: Any) -> Any:
        blocks, num_hit, *rest = original(self, request)
        row = first_scored_row(request.sampling_params)
        if row is None or num_hit == 0:
            return (blocks, num_hit, *rest)
        capped = capped_hit(num_hit, row + 1, _alignment(self))
        if capped == num_hit:
            return (blocks, num_hit, *rest)
        if capped == 0:
            return (self.empty_kv_cache_blocks, 0, *rest)
        return (self.truncate_computed_blocks(blocks, capped), capped, *rest)

    return get_computed_blocks


def apply() -> None:
    check_version(NAME, SUPPORTED)
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    if mark_applied(KVCacheManager, NAME):
        KVCacheManager.get_computed_blocks = _wrap(KVCacheManager.get_computed_blocks)
