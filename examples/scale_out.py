"""Steps/s of MeZO with 1 and 2 data-parallel replicas, side by side, and the bytes per step.

    python examples/scale_out.py [--steps 10] [--batch-size 16] [--out runs/scale_out.json]

Runs the same SST-2 steps (same batches and seeds) on: the in-process engine (all cores), one
Ray replica and two Ray replicas (the cores split between them), timing each step's three
engine calls (write the ± variants, score, apply the update) and counting the pickled bytes
between the driver and the replicas; then the bytes of one step with an all-linear adapter, to
show they do not grow with the adapter. Prints a table and writes the figures as JSON: the
docs/scaling.md and its scaling model come from them.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np

from mezo_vllm.adapter import LoraAdapter, LoraSpec, model_linear_shapes
from mezo_vllm.data import load_task
from mezo_vllm.engine import EngineConfig, VllmEngine
from mezo_vllm.estimator import ZOSGD
from mezo_vllm.model import prepare_default_model
from mezo_vllm.replicas import ReplicatedEngine
from mezo_vllm.data import Split
from mezo_vllm.trainer import batch_examples, batch_loss, step_seed


class _Timed:
    """An engine whose write/score/apply calls are timed (the trainer's step, call by call)."""

    def __init__(self, engine):
        self.engine = engine
        self.seconds = {"write": 0.0, "score": 0.0, "apply": 0.0}

    def _time(self, key, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds[key] += time.perf_counter() - t0
        return out

    def step(self, split, requests, seed, eps, lr):
        self._time("write", self.engine.write_variants, [(seed, eps), (seed, -eps)])
        sums = self._time("score", self.engine.score, requests, [0, 1])
        losses = batch_loss(split, requests, sums).tolist()
        g = (losses[0] - losses[1]) / (2 * eps)
        self._time("apply", self.engine.apply_update, ZOSGD().update([seed], [g], lr))
        return losses


def _measure(name, engine, split, steps, batch_size):
    examples = sorted(split.by_example)
    timed = _Timed(engine)
    timed.step(split, split.requests_of(examples[:batch_size]), 12345, 1e-2, 0.0)  # warm-up
    timed.seconds = dict.fromkeys(timed.seconds, 0.0)
    wire0 = dict(getattr(engine, "wire", {"sent": 0, "received": 0}))
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        requests = split.requests_of(batch_examples(0, step, examples, batch_size))
        losses.append(timed.step(split, requests, step_seed(0, step, 0), 1e-2, 2e-3))
    wall = time.perf_counter() - t0
    wire = getattr(engine, "wire", None)
    row = {"engine": name, "steps_per_s": steps / wall,
           **{f"{k}_s_per_step": v / steps for k, v in timed.seconds.items()},
           "losses": losses}
    if wire is not None:
        row.update(sent_bytes_per_step=(wire["sent"] - wire0["sent"]) / steps,
                   received_bytes_per_step=(wire["received"] - wire0["received"]) / steps)
    print(f"{name}: {row['steps_per_s']:.3f} steps/s; per step write {row['write_s_per_step']*1e3:.0f} ms, "
          f"score {row['score_s_per_step']*1e3:.0f} ms, apply {row['apply_s_per_step']*1e3:.0f} ms"
          + (f"; {row['sent_bytes_per_step']:.0f} B sent, {row['received_bytes_per_step']:.0f} B received"
             if wire is not None else ""), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="runs/scale_out.json")
    args = parser.parse_args()

    model = str(prepare_default_model())
    shapes = model_linear_shapes(model)
    adapter = LoraAdapter.init(LoraSpec(), shapes, seed=0)
    config = EngineConfig(model=model, dtype="float32")
    task = load_task("sst2").train
    rows = []

    engine = VllmEngine(config, adapter)
    split = Split.make(task, engine.tokenizer, config.max_model_len, "truncate")
    rows.append(_measure("in-process engine", engine, split, args.steps, args.batch_size))
    del engine
    gc.collect()

    for n in (1, 2):
        t0 = time.perf_counter()
        engine = ReplicatedEngine(config, adapter, replicas=n)
        start = time.perf_counter() - t0
        rows.append({**_measure(f"{n} Ray replica(s)", engine, split, args.steps, args.batch_size),
                     "start_s": start})
        if n == 2:  # the same steps' bytes with an adapter on every linear layer
            big = LoraAdapter.init(LoraSpec(targets=tuple(sorted({m.rsplit(".", 1)[-1] for m in shapes}))),
                                   shapes, seed=0)
            engine.load_master(big)
            row = _measure("2 Ray replicas, all-linear adapter", engine, split, args.steps, args.batch_size)
            rows.append({**row, "adapter_params": big.num_params()})
        engine.close()
    rows[0]["adapter_params"] = adapter.num_params()

    same = max(float(np.abs(np.array(r["losses"]) - np.array(rows[0]["losses"])).max()) for r in rows[1:3])
    print(f"max |Δ loss| between the three runs: {same:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"batch_size": args.batch_size, "steps": args.steps,
                                          "max_loss_difference": same, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
