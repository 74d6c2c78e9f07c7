"""Time vLLM's CPU LoRA ops, upstream vs the `fast_cpu_lora` patch, on SmolLM2-135M shapes.

    python examples/profile_lora_ops.py [--tokens 2048] [--dtype bfloat16] [--repeat 5]

Per op (shrink into the fp32 buffer, expand into the layer output) and per decoder layer (the
seven LoRA linears through `PunicaWrapperCPU.add_lora_linear`, as the model calls them); the
tokens are split into one segment per slot, as mezo-vllm's variant-major batches are.
"""

from __future__ import annotations

import argparse
import time

import torch

HIDDEN, KV, INTER, RANK, SLOTS = 576, 192, 1536, 8, 2
# (name, input size, output slices) of one Llama decoder layer's LoRA linears
LAYER = [("qkv_proj", HIDDEN, (HIDDEN, KV, KV)), ("o_proj", HIDDEN, (HIDDEN,)),
         ("gate_up_proj", HIDDEN, (INTER, INTER)), ("down_proj", INTER, (HIDDEN,))]


def best_of(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    from vllm.lora.ops.torch_ops import sgmv_expand, sgmv_expand_slice, sgmv_shrink
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from mezo_vllm.patches import fast_cpu_lora as fast

    n, rep = args.tokens, args.repeat
    slots = torch.arange(SLOTS).repeat_interleave(n // SLOTS)
    wrapper = PunicaWrapperCPU(n, 8, "cpu")
    wrapper._update_prefill_metadata(slots)
    wrapper.is_prefill = True
    meta = wrapper.prefill_metadata
    segs = fast.segments(*meta[:3])

    print(f"{n} tokens in {len(segs)} segments, r={RANK}, {args.dtype}; best of {rep}, ms")
    print(f"{'op':34s} {'upstream':>9s} {'patched':>9s} {'speed-up':>8s}")
    rows = []
    for name, fan_in in [("shrink 576->8", HIDDEN), ("shrink 1536->8", INTER)]:
        x = torch.randn(n, fan_in, dtype=dtype)
        a = torch.randn(SLOTS, 1, RANK, fan_in, dtype=dtype)
        y = torch.zeros(n, RANK, dtype=torch.float32)
        rows.append((name, best_of(lambda: sgmv_shrink(x, a, y, *meta, 1.0), rep),
                     best_of(lambda: fast.shrink(y, x, a, segs, 1.0), rep)))
    for out in (HIDDEN, KV, INTER):
        x = torch.zeros(n, RANK, dtype=torch.float32).normal_()
        b = torch.randn(SLOTS, 1, out, RANK, dtype=dtype)
        y = torch.zeros(n, out, dtype=dtype)
        rows.append((f"expand 8->{out}",
                     best_of(lambda: sgmv_expand(x, b, y, *meta, True), rep),
                     best_of(lambda: fast.expand(y, x, b, segs, True), rep)))
        y2 = torch.zeros(n, out + HIDDEN, dtype=dtype)
        rows.append((f"expand_slice 8->{out} @{HIDDEN}",
                     best_of(lambda: sgmv_expand_slice(x, b, y2, *meta, HIDDEN, out, True), rep),
                     best_of(lambda: fast.expand_slice(y2, x, b, segs, HIDDEN, out, True), rep)))
    for name, up, pt in rows:
        print(f"{name:34s} {up * 1e3:9.2f} {pt * 1e3:9.2f} {up / pt:7.1f}x")

    # One decoder layer: the seven LoRA linears, through add_lora_linear, before and after apply().
    layer = []
    for _, fan_in, outs in LAYER:
        layer.append((torch.randn(n, fan_in, dtype=dtype), torch.zeros(n, sum(outs), dtype=dtype),
                      tuple(torch.randn(SLOTS, 1, RANK, fan_in, dtype=dtype) for _ in outs),
                      tuple(torch.randn(SLOTS, 1, o, RANK, dtype=dtype) for o in outs), outs))

    def run_layer():
        for x, y, a, b, outs in layer:
            wrapper.add_lora_linear(y, x, a, b, 1.0, outs)

    base = [(torch.randn(sum(outs), fan_in, dtype=dtype), torch.randn(n, fan_in, dtype=dtype))
            for _, fan_in, outs in LAYER]
    t_base = best_of(lambda: [x @ w.T for w, x in base], rep)
    assert not getattr(PunicaWrapperCPU, f"_mezo_vllm_patch_{fast.NAME}", False)
    t_up = best_of(run_layer, rep)
    fast.apply()
    t_fast = best_of(run_layer, rep)
    print(f"\nper decoder layer (7 LoRA linears, add_lora_linear): upstream {t_up * 1e3:.1f} ms, "
          f"patched {t_fast * 1e3:.1f} ms ({t_up / t_fast:.1f}x); "
          f"the base linears themselves: {t_base * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
