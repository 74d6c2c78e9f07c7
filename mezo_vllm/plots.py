"""Pictures of a run: people read curves, not JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .outputs import dev_lines, is_train_line, key_metric


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run: Path) -> Path:
    """`curves.png`: the train loss (each step's, and its moving average) and the dev metric
    (the best point marked), over steps, from metrics.jsonl."""
    records = _records(run / "metrics.jsonl")
    train = [r for r in records if is_train_line(r) and r["train_loss"] is not None]
    dev = dev_lines(records)
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["train_loss"] for r in train], alpha=0.3, label="batch loss (mean of the step's losses)")
        ax_loss.plot(steps, [r["train_loss_ema"] for r in train], label="moving average")
        ax_loss.legend()
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
    if dev:
        key, higher = key_metric(dev[0])
        values = [m[key] for m in dev]
        ax_dev.plot([m["step"] for m in dev], values, marker="o")
        best = values.index(max(values) if higher else min(values))
        ax_dev.plot([dev[best]["step"]], [values[best]], marker="*", markersize=14, linestyle="",
                    label=f"best: {values[best]:.4f} at step {dev[best]['step']} (best/)")
        ax_dev.legend()
        ax_dev.set(ylabel=f"dev {key}")
    ax_dev.set(title="dev metric", xlabel="step")
    fig.tight_layout()
    out = run / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
