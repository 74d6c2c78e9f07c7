"""Pictures of a run: people read curves, not JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run: Path) -> Path:
    """`curves.png`: training loss (raw and smoothed) and the dev metric, over steps."""
    steps = _records(run / "trajectory.jsonl")
    metrics = _records(run / "metrics.jsonl")
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        x = np.array([r["step"] for r in steps])
        # one-sided rules (FZOO) log L(θ) itself; two-sided ones the mean of the ±ε pair
        y = np.array([r["loss"] if "loss" in r else (r["loss_plus"] + r["loss_minus"]) / 2 for r in steps])
        ax_loss.plot(x, y, alpha=0.3, label="batch loss (L(θ), or the mean of ±ε)")
        window = max(1, len(y) // 20)
        if window > 1:
            smooth = np.convolve(y, np.ones(window) / window, mode="valid")
            ax_loss.plot(x[window - 1 :], smooth, label=f"moving average ({window} steps)")
        ax_loss.legend()
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
    if metrics:
        key = "accuracy" if "accuracy" in metrics[0] else "nll"
        ax_dev.plot([m["step"] for m in metrics], [m[key] for m in metrics], marker="o")
        ax_dev.set(ylabel=f"dev {key}")
    ax_dev.set(title="dev metric", xlabel="step")
    fig.tight_layout()
    out = run / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
