"""The benchmark's own arithmetic, without an engine: the LoRA ÷ no-LoRA ratio holds against
one slow call, as a shared 2-core machine makes them."""

from __future__ import annotations

from mezo_vllm import bench


class _Clock:
    """A perf_counter that only the fake engine moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Engine:
    """Scores in 1.0 s without an adapter and 1.1 s with one; `slow` calls take 3× longer."""

    def __init__(self, clock: _Clock, slow: set[int]) -> None:
        self.clock, self.slow, self.calls = clock, slow, 0

    def score(self, requests: list, variants: list) -> None:
        took = 1.0 if variants == [None, None] else 1.1
        self.clock.now += took * (3 if self.calls in self.slow else 1)
        self.calls += 1


def test_lora_vs_no_lora_is_not_moved_by_one_slow_call(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    runner = object.__new__(bench._Vllm)
    for slow in (set(), {3}, {2}):  # calls 0-1 warm up; 2 is the first timed base call, 3 the first timed LoRA one
        runner.engine = _Engine(clock, slow)
        assert abs(runner.lora_vs_no_lora([]) - 1.0 / 1.1) < 1e-9
    runner.engine = _Engine(clock, set())
    assert abs(runner.lora_vs_no_lora([], repeats=1) - 1.0 / 1.1) < 1e-9
