"""mezo_vllm/patches/prefix_sharing: span requests share cached prefixes, never over their target span."""

from __future__ import annotations

import numpy as np
import pytest


from vllm.v1.core.kv_cache_manager import KVCacheManager

from mezo_vllm.data import Request
from mezo_vllm.patches import (
    prefix_sharing,
    span_logprobs,
)

PREFIX = 512


@pytest.fixture(scope="module", autouse=True)
def patched():
    prefix_sharing.apply()


@pytest.mark.parametrize(
    "num_hit,span_start,alignment,expected",
    [
        (0, 10, 32, 0),
        (64, 100, 32, 64),  # the hit ends below the span: unchanged
        (96, 97, 32, 96),  # ends exactly at the first span row (96)
        (128, 97, 32, 96),  # would cover rows 96..127: back to the block boundary below 96
        (128, 96, 32, 64),  # first span row 95: its block (64..95) is computed
        (128, 20, 32, 0),
        (512, 300, 128, 256),
    ],
)
def test_capped_hit(num_hit, span_start, alignment, expected):
    assert prefix_sharing.capped_hit(num_hit, span_start, alignment) == expected


def shared_prefix_batch(seed: int = 0) -> list[Request]:
    """16 examples after the same 512-token prefix (few-shot demonstrations), each with its own
    context and 2 options of 1-3 tokens."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(10, 40000, PREFIX).tolist()
    reqs = []
    for e in range(16):
        context = rng.integers(10, 40000, int(rng.integers(20, 60))).tolist()
        for o in range(2):
            option = rng.integers(10, 40000, int(rng.integers(1, 4))).tolist()
            ids = tuple(prefix + context + option)
            reqs.append(Request(e, o, ids, len(ids) - len(option)))
    return reqs


def test_shared_prefixes_give_the_same_scores(engine_fp32, random_adapter, monkeypatch):
    """Both variants θ±εz in one call, sharing prefixes: each variant's scores are the ones it
    gets alone, without sharing, and each variant computed the 512-token prefix once. The case
    has teeth: the ± variants' KV of the prefix differ, so a variant that read the other's
    (what sharing across variants would do) scores differently, as a deliberately wrong block
    hash (LoRA left out of it) shows."""
    from vllm.v1.core import kv_cache_utils

    engine_fp32.load_master(random_adapter)
    engine_fp32.write_variants([(7, 0.05), (7, -0.05)])  # fresh LoRA names: nothing cached yet
    reqs = shared_prefix_batch()
    loras = engine_fp32._variant_loras([0, 1])
    computed: list[int] = []  # tokens each request computed in each step
    original = span_logprobs.chunk_span_rows

    def recording(c0, n, length, start):
        computed.append(n)
        return original(c0, n, length, start)

    monkeypatch.setattr(span_logprobs, "chunk_span_rows", recording)
    shared = engine_fp32._score_spans(reqs, loras, share_prefix=True)
    # Each variant computed the prefix once, whatever the step it was computed in.
    once = PREFIX + sum(len(r.token_ids) - PREFIX for r in reqs)
    assert sum(computed) <= len(loras) * once, (sum(computed), once)
    monkeypatch.setattr(span_logprobs, "chunk_span_rows", original)
    # Scores do not depend on the batch: compare with a few examples scored without sharing,
    # one variant per call (so that no prompt is split across steps).
    some = [i for i, r in enumerate(reqs) if r.example in (0, 7, 15)]
    alone = np.stack([engine_fp32._score_spans([reqs[i] for i in some], [lora], share_prefix=False)[0]
                      for lora in loras])
    # the same up to fp32 rounding (GEMM blocking follows the batch; sums are ~-40)
    np.testing.assert_allclose(shared[:, some], alone, rtol=5e-6, atol=1e-5)

    engine_fp32.write_variants([(7, 0.05), (7, -0.05)])  # fresh names again
    monkeypatch.setattr(kv_cache_utils, "_gen_lora_extra_hash_keys", lambda request: [])
    try:
        wrong = engine_fp32._score_spans(reqs, engine_fp32._variant_loras([0, 1]), share_prefix=True)
    finally:
        monkeypatch.undo()
        engine_fp32.llm.reset_prefix_cache()  # blocks hashed without their LoRA must not stay
    np.testing.assert_allclose(wrong[0], shared[0], rtol=5e-6, atol=1e-5)  # the first one computes
    assert np.abs(wrong[1, some] - alone[1]).max() > 100 * 1e-5  # θ−εz read θ+εz's prefix KV


def test_cached_prefix_never_covers_the_span(engine_fp32, monkeypatch):
    """A prompt scored twice is fully cached the second time: the hit must stop below the span
    (here a 100-token span, longer than a block). Without the cap its rows go missing."""
    rng = np.random.default_rng(3)
    ids = tuple(rng.integers(10, 40000, 300).tolist())
    req = Request(0, 0, ids, 200)
    loras = engine_fp32._variant_loras([None])
    first = engine_fp32._score_spans([req], loras, share_prefix=True)
    again = engine_fp32._score_spans([req], loras, share_prefix=True)
    np.testing.assert_allclose(again, first, rtol=0, atol=1e-5)
    monkeypatch.setattr(prefix_sharing, "capped_hit", lambda num_hit, *_: num_hit)
    with pytest.raises(span_logprobs.SpanError, match="never computed"):
        engine_fp32._score_spans([req], loras, share_prefix=True)


def test_apply_is_idempotent():
    method = KVCacheManager.get_computed_blocks
    prefix_sharing.apply()
    assert KVCacheManager.get_computed_blocks is method
    assert method.__module__ == prefix_sharing.__name__
    assert getattr(KVCacheManager, f"_mezo_vllm_patch_{prefix_sharing.NAME}") is True
