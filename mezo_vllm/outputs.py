"""What a run publishes for its user, beside the resumable `checkpoint/` (rundir.py):

- `best/`: the adapter of the best dev metric so far (highest accuracy or F1, lowest NLL);
- `adapter/`: the final adapter; `checkpoint-STEP/`: the last --save-total-limit scheduled saves;
- train lines in `metrics.jsonl` beside the dev lines (each step's loss, its moving average,
  lr and |g|), and the same scalars in TensorBoard with --report-to tensorboard;
- `summary.json` (and `curves.png`, plots.py), and the lines printed at the end: best step and metric, time, where the
  adapters are, the command that serves one.

Each of them is a function of the logs and the checkpoint (which holds the best adapter so
far), so a resumed run publishes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import console, rundir
from .adapter import LoraAdapter, LoraSpec
from .config import TuneConfig

EMA_BETA = 0.9  # the moving average of the train loss shown by the progress bar
# A dev metric this much (relative) worse than the start's is a run going wrong, not noise: the
# default SST-2 runs never dip 5% below their start, the runs that collapsed did (docs/quality.md).
WORSE_THAN_START = 0.05
_NOT_METRICS = ("step", "skipped_steps", "wall_s")


def is_train_line(record: dict) -> bool:
    return "train_loss" in record


def dev_lines(records: Sequence[dict]) -> list[dict]:
    """The dev evaluations among metrics.jsonl's lines."""
    return [r for r in records if not is_train_line(r)]


def key_metric(metrics: dict) -> tuple[str, bool]:
    """The dev metric that picks `best/`, and whether higher is better."""
    for name in ("accuracy", "f1"):
        if name in metrics:
            return name, True
    return "nll", False


def worse_than_start(value: float, start: float, higher: bool) -> bool:
    """Whether a dev metric has fallen `WORSE_THAN_START` (relative) behind the untrained adapter's."""
    return value < start * (1 - WORSE_THAN_START) if higher else value > start * (1 + WORSE_THAN_START)


def _finite(value: float) -> float | None:
    """JSON has no NaN: a skipped step's loss is null."""
    return value if math.isfinite(value) else None


class LossAverage:
    """The bias-corrected moving average (as Adam's moments) of the finite train losses. A
    resumed run rebuilds it from the train lines with the same float operations, so it logs
    the same digits as an uninterrupted one."""

    def __init__(self) -> None:
        self.raw, self.count = 0.0, 0

    def add(self, loss: float | None) -> float | None:
        if loss is not None:
            self.raw = EMA_BETA * self.raw + (1 - EMA_BETA) * loss
            self.count += 1
        return self.raw / (1 - EMA_BETA ** self.count) if self.count else None


def serve_command(adapter_dir: Path) -> str:
    """The line that serves an adapter (README, "Serving"): `mezo-vllm serve`, not `vllm serve`,
    whose CLI dies in the CPU environment and which needs the base model, rank and patches spelt
    out; `mezo-vllm serve` reads them from the adapter."""
    return shlex.join(["mezo-vllm", "serve", str(adapter_dir.absolute())])


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m{s:02d}s" if minutes >= 60 else f"{minutes}m{s:02d}s"


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_summary(summary: dict, run: Path) -> list[str]:
    """The lines a run ends with."""
    name = summary["metric"]
    dev = (f"dev {name} {_figure(summary['initial_metric'])} → {_figure(summary['final_metric'])}, best "
           f"{_figure(summary['best_metric'])} at step {summary['best_step']}" if name else "no dev data, so no best/")
    lines = [f"done: {summary['steps']} steps in {_duration(summary['wall_s'])}; {dev}",
             f"adapter:      {summary['adapter']}"]
    if summary["best_adapter"]:
        lines.append(f"best adapter: {summary['best_adapter']} (step {summary['best_step']})")
    return lines + [f"serve it:     {summary['serve']}", f"summary:      {(run / 'summary.json').absolute()}"]


class RunOutputs:
    """The outputs of one sitting of a run, from step `start` (after a resume: its checkpoint's)."""

    def __init__(self, cfg: TuneConfig, spec: LoraSpec, model_dir: str, start: int, resume: bool,
                 best: tuple[dict, LoraAdapter] | None):
        self.run, self.cfg, self.spec, self.model_dir = Path(cfg.out), cfg, spec, model_dir
        self.loss = LossAverage()
        records = rundir.read_log(self.run / "metrics.jsonl")[0]
        for record in records:
            if is_train_line(record):
                self.loss.add(record["train_loss"])
        self.start = next((r for r in dev_lines(records) if r["step"] == 0), None)
        self.warned = False  # once a sitting: the terminal stays quiet
        # best/ may have been rewritten after the checkpoint, by the sitting that was killed
        self.best = best
        if best is not None:
            self._publish("best", best[1])
        else:
            shutil.rmtree(self.run / "best", ignore_errors=True)
        rundir.prune_numbered(self.run, cfg.save_total_limit, after=start)
        self.writer = None
        if cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # events from past the checkpoint (a killed sitting's) are dropped by TensorBoard
            self.writer = SummaryWriter(str(self.run / "tensorboard"), purge_step=start + 1 if resume else None)

    def _publish(self, name: str, adapter: LoraAdapter) -> None:
        rundir.write_whole(self.run / name, lambda folder: adapter.save(folder, self.model_dir))

    def _scalars(self, group: str, values: dict) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if key not in _NOT_METRICS and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{group}/{key}", value, values["step"])

    def trained(self, done: int, losses: Sequence[float], grads: Sequence[float], lr: float) -> dict[str, str]:
        """A train line for the step that made `done` steps; the progress bar's figures."""
        loss = _finite(float(np.mean(losses)))
        average, abs_g = self.loss.add(loss), _finite(float(np.mean(np.abs(grads))))
        line = {"step": done, "train_loss": loss, "train_loss_ema": average, "lr": lr, "abs_g": abs_g}
        rundir.append_jsonl(self.run / "metrics.jsonl", line)
        self._scalars("train", line)
        return {"loss": f"{average:.4f}" if average is not None else "-", "lr": f"{lr:.2e}",
                "|g|": f"{abs_g:.3g}" if abs_g is not None else "nan"}

    def evaluated(self, metrics: dict, master: Callable[[], dict]) -> None:
        """A dev line; `best/` (from the engine's `master`) when its key metric is the best yet; one
        line on the terminal the first time the metric falls behind the start's (a run going wrong
        keeps running: its best/ is safe, and the user decides)."""
        rundir.append_jsonl(self.run / "metrics.jsonl", metrics)
        self._scalars("dev", metrics)
        name, higher = key_metric(metrics)
        value = metrics[name]
        if self.best is None or (value > self.best[0]["value"] if higher else value < self.best[0]["value"]):
            adapter = LoraAdapter(self.spec, master())
            self._publish("best", adapter)
            self.best = ({"step": metrics["step"], "metric": name, "value": value}, adapter)
        if metrics["step"] == 0:
            self.start = metrics
        elif not self.warned and self.start is not None and worse_than_start(value, self.start[name], higher):
            self.warned = True
            best = self.best[0]
            console.say(f"step {metrics['step']}: dev {name} {value:.4f} is worse than at the start "
                        f"({self.start[name]:.4f}): training is making the model worse (the lr may be too "
                        f"large for this task: try a smaller --lr); best/ keeps step {best['step']} "
                        f"({best['value']:.4f})")

    def checkpoint(self, adapter: LoraAdapter, step: int, scheduled: bool) -> None:
        """`checkpoint/` (with the best so far); a scheduled save (--save-every, the last step)
        is also kept as `checkpoint-STEP/` under --save-total-limit. The numbered one is
        written first: a kill between the two leaves one past the checkpoint, which the resumed
        run removes and writes again."""
        keep = self.cfg.save_total_limit if scheduled else 0
        if keep:
            self._publish(f"{rundir.NUMBERED}{step}", adapter)
        rundir.save_checkpoint(self.run, adapter, self.model_dir, step, self.best)
        if keep:
            rundir.prune_numbered(self.run, keep)

    def finish(self, final: LoraAdapter, first: dict | None, last: dict | None, wall_s: float) -> dict[str, Any]:
        """`adapter/` and `summary.json`; returns the summary."""
        self._publish("adapter", final)
        name = key_metric(last)[0] if last else None
        best = self.best[0] if self.best else None
        served = self.run / ("best" if best else "adapter")
        summary = {
            "steps": self.cfg.steps, "metric": name,
            "initial_metric": first[name] if first and name else None,
            "final_metric": last[name] if last and name else None,
            "best_step": best["step"] if best else None, "best_metric": best["value"] if best else None,
            "wall_s": round(wall_s, 1),
            "adapter": str((self.run / "adapter").absolute()),
            "best_adapter": str((self.run / "best").absolute()) if best else None,
            "checkpoints": [str(p.absolute()) for p in rundir.numbered_checkpoints(self.run).values()],
            "serve": serve_command(served),
        }
        rundir.write_file(self.run / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
