"""vLLM general plugin: the engine's patches in worker processes it did not start itself.

A tensor- or pipeline-parallel engine runs its model in worker processes that vLLM spawns, so
patches applied in the driver (`apply_all`) never reach them. vLLM calls every
`vllm.general_plugins` entry point in each process it starts; this one applies the patches
named in the environment variable `ENV` (set by `mezo_vllm.engine` while it starts an engine,
and by `mezo-vllm serve` for the server it starts) and does nothing without it, so a stock vLLM
(`vllm serve`) on the same install stays stock.
"""

from __future__ import annotations

import os

ENV = "MEZO_VLLM_WORKER_PATCHES"  # "required", "all" or "serve"
LEVELS = ("required", "all", "serve")


def load() -> None:
    level = os.environ.get(ENV)
    if not level:
        return
    if level not in LEVELS:
        raise ValueError(f"{ENV}={level!r}: expected one of {', '.join(LEVELS)}")
    from . import apply_all, for_engine

    apply_all(for_engine(level))
