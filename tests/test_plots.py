"""Figures: the loss-curve PNG and the grid of samples by class."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.plots import grid_by_class, save_loss_curve


def test_loss_curve_is_a_png(tmp_path):
    history = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "grad_norm": 1.0, "images_per_s": 100.0}
               for s in range(10, 110, 10)]
    path = tmp_path / "out" / "loss.png"
    save_loss_curve(history, path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (600, 350)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    # the loss line is drawn in matplotlib's tab:blue (31, 119, 180)
    assert (np.abs(pixels.astype(int) - [31, 119, 180]).sum(1) < 30).sum() > 100
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temporary file left


def test_loss_curve_without_history_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="loss.png: no logged training steps"):
        save_loss_curve([], tmp_path / "loss.png")


def test_grid_by_class_puts_each_class_in_its_row_and_leaves_missing_ones_black():
    # image i is filled with the value 10 * (i + 1); classes: 1, 0, 1, 1 (none of class 2)
    images = (torch.arange(1, 5, dtype=torch.uint8) * 10).view(4, 1, 1, 1).expand(4, 1, 3, 3)
    labels = torch.tensor([1, 0, 1, 1])
    grid = np.asarray(grid_by_class(images, labels, num_classes=3, per_class=2))
    assert grid.shape == (2 + 3 * 5, 2 + 2 * 5)  # padding 2: (2 + rows * (3 + 2)) x ...
    tile = lambda row, col: grid[2 + row * 5:5 + row * 5, 2 + col * 5:5 + col * 5]  # noqa: E731
    assert (tile(0, 0) == 20).all() and (tile(0, 1) == 0).all()  # class 0: image 1 only
    assert (tile(1, 0) == 10).all() and (tile(1, 1) == 30).all()  # class 1: first two of three
    assert (tile(2, 0) == 0).all() and (tile(2, 1) == 0).all()  # class 2: none drawn
