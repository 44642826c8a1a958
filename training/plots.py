"""The loss curve people look at: training and validation loss against optimizer steps, as a PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from glade.atomic import save_figure


def plot_loss_curve(records: Sequence[dict[str, Any]], png_path: str | Path, title: str = "Glade pre-training") -> Path:
    """Plot the `train_loss` and `val_loss` of metrics records (as in metrics.jsonl) into `png_path`."""
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        raise ValueError("no train_loss or val_loss records to plot")
    figure = Figure(figsize=(7, 4.5), dpi=120)  # no pyplot: no global state, no display backend needed
    axes = figure.subplots()
    if train:
        axes.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        axes.plot(*zip(*val), "o-", label="validation", linewidth=1.5, markersize=4)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats / token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return save_figure(figure, png_path)
