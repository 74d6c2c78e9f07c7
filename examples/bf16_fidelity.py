"""How faithful is the projected gradient g when the engine runs in bfloat16?

MeZO's signal is a loss *difference* between θ+εz and θ−εz. bf16 halves the engine's time on
this CPU but rounds activations to ~3 significant digits, which can drown that difference. This
script computes g for the same SST-2 batch and the same seeds in an fp32 and a bf16 engine (one
child process each) and prints, per ε, the correlation of the two and bf16's relative error.

A larger ε shrinks bf16's rounding relative to the difference, but g is the slope along z only
as ε → 0: LoRA's update is the product BA, so θ ± εz moves the weights by ±ε·(z_B A + B z_A) +
ε²·z_B z_A, and the second-order term (Gaussian z_A against A's small init) soon dominates. So
each ε's g is also compared with the slope, fp32 g at the smallest ε.

    python examples/bf16_fidelity.py [--seeds 12]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np

EPS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def projected_gradients(dtype: str, n_seeds: int) -> dict[str, list[float]]:
    from mezo_vllm.adapter import LoraAdapter, LoraSpec, model_linear_shapes
    from mezo_vllm.data import load_task
    from mezo_vllm.engine import EngineConfig, VllmEngine
    from mezo_vllm.estimator import projected_gradient
    from mezo_vllm.model import resolve_model
    from mezo_vllm.data import Split
    from mezo_vllm.trainer import batch_examples, batch_loss

    model_dir = str(resolve_model(None))
    adapter = LoraAdapter.init(LoraSpec(), model_linear_shapes(model_dir), seed=0)
    engine = VllmEngine(EngineConfig(model=model_dir, dtype=dtype), adapter)
    split = Split.make(load_task("sst2").train, engine.tokenizer, 1024, "truncate")
    requests = split.requests_of(batch_examples(0, 0, sorted(split.by_example), 16))
    out: dict[str, list[float]] = {}
    for eps in EPS:
        grads = []
        for seed in range(n_seeds):
            engine.write_variants([(seed, eps), (seed, -eps)])
            plus, minus = batch_loss(split, requests, engine.score(requests, [0, 1])).tolist()
            grads.append(projected_gradient(plus, minus, eps))
        out[str(eps)] = grads
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--child", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(projected_gradients(args.child, args.seeds)))
        return
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cmd = [sys.executable, __file__, "--child", dtype, "--seeds", str(args.seeds)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs[dtype] = json.loads(done.stdout.strip().splitlines()[-1])
    slope = np.array(runs["float32"][str(EPS[0])])
    print(r"| ε | corr(g_bf16, g_fp32) | median \|g_bf16 − g_fp32\| / \|g_fp32\| | corr(g_fp32, slope) | "
          r"\|g_fp32 − slope\| / \|slope\| | corr(g_bf16, slope) | median \|g_fp32\| |")
    print("|---|---|---|---|---|---|---|")
    for eps in map(str, EPS):
        a, b = np.array(runs["float32"][eps]), np.array(runs["bfloat16"][eps])
        rel = np.median(np.abs(b - a) / np.maximum(np.abs(a), 1e-12))
        off = np.linalg.norm(a - slope) / np.linalg.norm(slope)
        print(f"| {eps} | {np.corrcoef(a, b)[0, 1]:.3f} | {rel:.3f} | {np.corrcoef(a, slope)[0, 1]:.3f} | {off:.3f} | "
              f"{np.corrcoef(b, slope)[0, 1]:.3f} | {np.median(np.abs(a)):.3f} |")


if __name__ == "__main__":
    main()
