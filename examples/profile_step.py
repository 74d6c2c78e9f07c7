"""Where one MeZO step's time goes: `tune`'s default step (SST-2, batch 16, 4 directions = 8
LoRA slots, q/v r8) profiled with torch.profiler in the in-process engine.

    python examples/profile_step.py [--dtype bfloat16] [--directions 4] [--steps 3] [--compile]

Prints the step's wall time split into the engine's three calls (write the variants, score,
apply the update), the time inside torch/vLLM kernels by kind (GEMMs, attention, LoRA,
element-wise, the rest) and what is left outside any kernel (Python: vLLM's scheduler, input and
output processing, our request building), plus the tokens forwarded and their share of the
machine's matmul peak as `mezo-vllm bench` measures it.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import time
from collections import defaultdict

import click

# Kernel kinds by the profiler's op names (self time: nested ops are not counted twice).
KINDS = (
    ("GEMM (base model)", ("aten::mm", "aten::addmm", "aten::linear", "onednn_mm", "aten::matmul", "aten::bmm",
                           "mkldnn", "_C::onednn")),
    ("attention", ("attention", "paged", "sdpa", "flash", "_C::cpu_attn", "varlen")),
    ("LoRA ops", ("mezo_vllm::", "einsum", "index_select")),
    ("element-wise / norms", ("aten::add", "aten::mul", "aten::silu", "aten::rsqrt", "aten::pow", "aten::mean",
                              "rms_norm", "rotary", "aten::cat", "aten::neg", "aten::copy_", "aten::to",
                              "aten::_to_copy", "silu_and_mul", "aten::sub", "aten::div", "aten::exp",
                              "aten::log_softmax", "aten::_log_softmax", "aten::clone", "aten::contiguous",
                              "aten::index", "aten::gather", "aten::embedding", "aten::slice", "aten::view",
                              "aten::reshape", "aten::empty", "aten::zeros", "aten::fill_", "aten::randn",
                              "aten::normal_")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k.lower() in low for k in keys):
            return kind
    return "other kernels"


@click.command()
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--directions", default=4, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--steps", default=3, show_default=True, help="profiled steps (after 2 warm-up steps)")
@click.option("--compile", "compiled", is_flag=True, help="vLLM's CPU compilation kept on with LoRA")
def main(dtype: str, directions: int, batch_size: int, steps: int, compiled: bool) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mezo_vllm.adapter import LoraAdapter, LoraSpec, model_linear_shapes
    from mezo_vllm.bench import flops_per_token, matmul_peak
    from mezo_vllm.data import Split, load_task
    from mezo_vllm.engine import EngineConfig, VllmEngine
    from mezo_vllm.estimator import ZOSGD
    from mezo_vllm.model import prepare_default_model
    from mezo_vllm.trainer import batch_examples, mezo_step, step_seed

    model = str(prepare_default_model())
    adapter = LoraAdapter.init(LoraSpec(), model_linear_shapes(model), seed=0)
    engine = VllmEngine(EngineConfig(model=model, dtype=dtype, n_variants=2 * directions, compile=compiled), adapter)
    train = Split.make(load_task("sst2").train, engine.tokenizer, 1024, "truncate")
    examples = sorted(train.by_example)
    timed: dict[str, float] = defaultdict(float)
    for name in ("write_variants", "score", "apply_update"):
        call = getattr(engine, name)

        def timed_call(*args, _call=call, _name=name):
            t0 = time.perf_counter()
            try:
                return _call(*args)
            finally:
                timed[_name] += time.perf_counter() - t0

        setattr(engine, name, timed_call)

    def step(k: int) -> int:
        requests = train.requests_of(batch_examples(0, k, examples, batch_size))
        seeds = [step_seed(0, k, d) for d in range(directions)]
        mezo_step(engine, train, requests, seeds, 1e-2, ZOSGD(), 1e-4)
        return sum(len(r.token_ids) - 1 for r in requests) * 2 * directions

    for k in range(2):
        step(k)
    timed.clear()
    tokens = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for k in range(2, 2 + steps):
            tokens += step(k)
        wall = (time.perf_counter() - t0) / steps
    by_kind: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith(("ProfilerStep", "## ")):
            continue
        seconds = event.self_cpu_time_total / 1e6 / steps
        by_kind[kind_of(event.key)] += seconds
        top[event.key] += seconds
    # the profiler counts every thread's kernel time; intra-op threads run kernels in parallel
    kernels = sum(by_kind.values())
    threads = torch.get_num_threads()
    click.echo(f"{dtype}, {directions} directions × batch {batch_size}, {'compiled' if compiled else 'eager'}: "
               f"{wall:.3f} s/step, {tokens / steps:.0f} tokens forwarded a step, "
               f"{tokens / steps / wall:.0f} tokens/s")
    peak = matmul_peak(dtype)
    flops = flops_per_token(model)
    click.echo(f"decoder matmul work: {tokens / steps * flops / wall / 1e9:.0f} GFLOP/s of a measured "
               f"{peak:.0f} GFLOP/s peak ({tokens / steps * flops / wall / 1e9 / peak:.0%})")
    click.echo("engine calls per step: " + ", ".join(f"{k} {v / steps * 1e3:.0f} ms" for k, v in timed.items()))
    click.echo(f"profiled op self time per step (summed over {threads} intra-op threads where ops run on "
               f"several: read as shares): {kernels * 1e3:.0f} ms")
    for kind, seconds in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        click.echo(f"  {kind:24s} {seconds * 1e3:8.1f} ms  {seconds / kernels:6.1%}")
    click.echo("top ops:")
    for key, seconds in sorted(top.items(), key=lambda kv: -kv[1])[:15]:
        click.echo(f"  {key[:60]:60s} {seconds * 1e3:8.1f} ms  {kind_of(key)}")


if __name__ == "__main__":
    main()
