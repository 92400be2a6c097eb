"""Figures of a run that need no MLflow UI: the loss curve as a PNG, and samples by class.

matplotlib draws with its Agg backend (files only, no display), so this works on a headless
machine. DVC declares both PNGs as image plots: `dvc plots diff` shows them per experiment.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on CI machines and DVC queue workers

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.data import grid_image  # noqa: E402
from pipeline.io import atomic_path  # noqa: E402


def save_loss_curve(history: list[dict[str, float]], path: Path) -> None:
    """Training loss (log scale, one point per logged interval) and learning rate by step.

    `history` holds the rows of pipeline.training (step, loss, lr, ...), as in history.csv.
    """
    if not history:
        raise ValueError(f"{path}: no logged training steps to plot")
    steps = [row["step"] for row in history]
    figure, loss_axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    loss_axis.plot(steps, [row["loss"] for row in history], color="tab:blue", marker=".")
    loss_axis.set(xlabel="step", ylabel="loss (mean over the log interval)", yscale="log")
    loss_axis.grid(True, which="both", alpha=0.3)
    lr_axis = loss_axis.twinx()
    lr_axis.plot(steps, [row["lr"] for row in history], color="tab:orange", alpha=0.6)
    lr_axis.set_ylabel("learning rate", color="tab:orange")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def grid_by_class(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  per_class: int = 8) -> Image.Image:
    """One row per class with its first `per_class` images (in order); a class with fewer
    images leaves black tiles, so a missing class shows as an empty row."""
    _, c, h, w = images.shape
    rows = torch.zeros(num_classes, per_class, c, h, w, dtype=images.dtype)
    for k in range(num_classes):
        members = images[labels == k][:per_class]
        rows[k, :len(members)] = members
    return grid_image(rows.flatten(0, 1), columns=per_class)
