"""Image folders to compact uint8 tensors, and the conversions between pixels and model space.

Any ImageFolder tree works as data: `<root>/<class>/<image>` (grey or colour, any size and any
format PIL reads). Each image is converted to the configured channel count, its shorter side
resized to `image_size` (bicubic; antialiased when shrinking) and centre-cropped to a square.
The result is an `ImageSet`: uint8 images [N, C, H, W], int64 class labels [N] and class names,
which is all that training and evaluation need and loads in a fraction of a second.
The model works in [-1, 1] (DDPM, Ho et al. 2020, sec. 3.3: pixels scaled linearly to [-1, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from pipeline.config import PreprocessParams
from pipeline.io import save_torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".pbm", ".bmp", ".gif", ".tif",
                  ".tiff", ".webp"}


class DataError(ValueError):
    """The data folder or an image in it cannot be used."""


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N], index into `classes`
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def save(self, path: str | Path) -> None:
        save_torch({"images": self.images, "labels": self.labels, "classes": list(self.classes)},
                   path)

    @classmethod
    def load(cls, path: str | Path) -> ImageSet:
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: not found; run the preprocess stage first (`dvc repro`)")
        data = torch.load(path, weights_only=True)
        return cls(data["images"], data["labels"], tuple(data["classes"]))


def find_images(folder: Path) -> tuple[list[Path], list[str], list[str]]:
    """Image files, their class names and the sorted class list of an ImageFolder tree.

    Classes are the sub-folders that hold images; a folder with images but no class
    sub-folders is one class named after the folder.
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, names = [], []
    for class_dir in class_dirs or [folder]:
        found = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        names += [class_dir.name] * len(found)
    if not files:
        raise DataError(f"{folder}: no images found (expected {folder}/<class>/<image>, "
                        f"with suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, names, sorted(set(names))


def load_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One image as uint8 [C, image_size, image_size]: converted, resized, centre-cropped."""
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: cannot read image: {err}") from err
    width, height = image.size
    scale = image_size / min(width, height)
    if scale != 1:
        size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None if scale > 1 else 3.0)
    left = (image.width - image_size) // 2
    top = (image.height - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def load_folder(folder: Path, image_size: int, channels: int,
                classes: list[str] | None = None) -> ImageSet:
    """Load an ImageFolder tree; with `classes` given, its class names must be among them."""
    files, names, found = find_images(folder)
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{folder}: classes {unknown} do not occur in the training images "
                        f"(known: {classes})")
    index = {name: i for i, name in enumerate(classes)}
    images = np.stack([load_image(f, image_size, channels) for f in files])
    labels = torch.tensor([index[n] for n in names], dtype=torch.int64)
    return ImageSet(torch.from_numpy(images), labels, tuple(classes))


def build_datasets(p: PreprocessParams) -> tuple[ImageSet, ImageSet]:
    """The training set and the held-out reference set that evaluation compares samples with."""
    root = Path(p.data_dir)
    if not root.is_dir():
        raise DataError(f"preprocess.data_dir = '{p.data_dir}': folder not found. Get the default "
                        "data with `uv run python -m stages.get_data`, or point "
                        "preprocess.data_dir at your own ImageFolder tree")
    generator = torch.Generator().manual_seed(p.seed)
    train = load_folder(root / p.train_split, p.image_size, p.channels)
    if p.test_split:
        held_out = load_folder(root / p.test_split, p.image_size, p.channels, list(train.classes))
    else:
        order = torch.randperm(len(train), generator=generator)
        n_held = max(1, round(p.holdout_fraction * len(train)))
        if n_held >= len(train):
            raise DataError(f"preprocess.holdout_fraction = {p.holdout_fraction} leaves no "
                            f"training images out of {len(train)}")
        train, held_out = train.subset(order[n_held:]), train.subset(order[:n_held])
    return (random_subset(train, p.max_train_images or len(train), generator),
            random_subset(held_out, p.max_reference_images, generator))


def random_subset(images: ImageSet, size: int, generator: torch.Generator) -> ImageSet:
    """At most `size` images, drawn without replacement, in their original order."""
    if len(images) <= size:
        return images
    return images.subset(torch.randperm(len(images), generator=generator)[:size].sort().values)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-space float in [-1, 1] -> uint8 pixels (values outside are clipped)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_image(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> Image.Image:
    """A uint8 [N, C, H, W] batch as one PIL image, `columns` wide (default: near square)."""
    n, c, h, w = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    # Pad each image on its bottom/right, lay the padded tiles out row by row, then add the
    # padding on the grid's top/left so every image has the same black frame around it.
    tiles = torch.zeros(rows * columns, c, h + padding, w + padding, dtype=torch.uint8)
    tiles[:n, :, :h, :w] = images
    grid = tiles.view(rows, columns, c, h + padding, w + padding).permute(2, 0, 3, 1, 4)
    grid = F.pad(grid.reshape(c, rows * (h + padding), columns * (w + padding)),
                 (padding, 0, padding, 0))
    array = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if c == 1 else array)
