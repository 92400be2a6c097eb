"""Image folders to compact uint8 tensors, and the conversions between pixels and model space.

Any ImageFolder tree works as data: `<root>/<class>/<image>` (grey or colour, any size and any
format PIL reads). Each image is converted to the configured channel count, its shorter side
resized to `image_size` (bicubic; antialiased when shrinking) and centre-cropped to a square.
The result is an `ImageSet`: uint8 images [N, C, H, W], int64 class labels [N] and class names,
which is all that training and evaluation need and loads in a fraction of a second.
A file that cannot be used (corrupt, truncated, not an image, smaller than `image_size` unless
upscaling is allowed), an empty class folder and a class folder that is a symbolic link (DVC
would not pin its images) are errors that name them, or with `preprocess.on_bad_image: skip`
warnings and a count of skipped files (`BadImages`).
The model works in [-1, 1] (DDPM, Ho et al. 2020, sec. 3.3: pixels scaled linearly to [-1, 1]).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import PreprocessParams
from pipeline.io import load_torch, save_torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".pbm", ".bmp", ".gif", ".tif",
                  ".tiff", ".webp"}
MAX_LISTED = 20  # skipped files named one line each on stderr; the rest are only counted


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
        data = load_torch(path)
        return cls(data["images"], data["labels"], tuple(data["classes"]))


@dataclass
class BadImages:
    """What happens to an unusable file or class folder, per `preprocess.on_bad_image`.

    `error` raises the DataError that names it. `skip` leaves it out with a warning on stderr:
    one line per file for the first `MAX_LISTED`, then only the count in `skipped`, so that a
    folder of thousands of broken files does not flood the log.
    """

    policy: Literal["error", "skip"] = "error"
    skipped: list[Path] = field(default_factory=list)  # every skipped file, listed or not

    def file(self, path: Path, err: DataError) -> None:
        if self.policy == "error":
            raise err
        self.skipped.append(path)
        if len(self.skipped) <= MAX_LISTED:
            warn(f"skipped {err}")
        elif len(self.skipped) == MAX_LISTED + 1:
            warn(f"more than {MAX_LISTED} bad files; the rest are skipped without a line each")

    def empty_class(self, folder: Path, why: str) -> None:
        if self.policy == "error":
            raise DataError(f"{folder}: {why}; a class folder must hold images (remove it, or "
                            "set preprocess.on_bad_image: skip)")
        warn(f"{folder}: {why}; not used as a class")

    def linked_folder(self, folder: Path) -> None:
        problem, fix = link_problem(folder)
        if self.policy == "error":
            raise DataError(f"{problem}; {fix} (or set preprocess.on_bad_image: skip to leave it "
                            "out)")
        warn(f"{problem}; not used as a class ({fix})")


def link_problem(folder: Path) -> tuple[str, str]:
    """Why a linked folder cannot be data, and how to mend it.

    `dvc add` skips a symbolic link to a folder, so the images in it would be trained on but
    not pinned by data.dvc, and a change to them would leave `dvc status` clean. (A linked
    file is fine: DVC hashes what it points to and pins that.)
    """
    target = folder.resolve()
    return (f"{folder}: a symbolic link to {target}; DVC does not version what a linked folder "
            "holds (`dvc add` skips it), so data.dvc would not pin these images",
            f"replace the link with a copy: rm {folder} && cp -r {target} {folder}")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def find_images(folder: Path, bad: BadImages) -> tuple[list[Path], list[str]]:
    """The files of an ImageFolder tree and their class names, sorted.

    Classes are the sub-folders; a folder without sub-folders is one class named after it.
    Every file in a class folder is returned, hidden dotfiles (.DS_Store) excepted, so that a
    file which is not an image becomes a bad file when loaded rather than silently ignored.
    Files next to the class folders (README.md, train.csv) are not data; images among them are
    reported as left out (`warn_loose_images`). An empty class folder and a class folder that
    is a symbolic link (which DVC would not pin) go to `bad`.
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    entries = visible(folder)
    class_dirs = sorted(d for d in entries if d.is_dir())
    if class_dirs:
        warn_loose_images(folder, entries)
    files, names = [], []
    for class_dir in class_dirs or [folder]:
        if class_dir.is_symlink():
            bad.linked_folder(class_dir)
            continue
        found = sorted(visible(class_dir))
        if class_dirs and not found:
            bad.empty_class(class_dir, "empty class folder")
        files += found
        names += [class_dir.name] * len(found)
    if not files:
        raise DataError(f"{folder}: no images found (expected {folder}/<class>/<image>, "
                        f"with suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, names


def warn_loose_images(folder: Path, entries: list[Path]) -> None:
    """Say which images next to the class folders are left out: a user who put them there most
    likely meant them as data. Other files there (README.md, train.csv) are left out silently."""
    loose = sorted(p.name for p in entries
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if loose:
        names = loose[0] if len(loose) == 1 else f"{loose[0]} ... {loose[-1]}"
        warn(f"{folder}: left out {plural(len(loose), 'image file')} beside the class folders "
             f"({names}); only <class>/<image> is read, so files next to class folders are not "
             "data: move them into a class folder")


def plural(count: int, noun: str, nouns: str = "") -> str:
    """'1 class', '2 classes', '0 files': the count with the noun that reads right."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def visible(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def load_image(path: Path, image_size: int, channels: int,
               allow_upscale: bool = False) -> np.ndarray:
    """One image as uint8 [C, image_size, image_size]: converted, resized, centre-cropped.

    Raises DataError naming the file if it is a folder (nested in a class folder) or not an
    image, cannot be decoded in full, has a mode without a defined 8-bit meaning, or (unless
    `allow_upscale`) is smaller than `image_size` on its shorter side.
    """
    if path.is_dir():
        raise DataError(f"{path}: a folder inside the class folder {path.parent}; only "
                        "<class>/<image> is read, nothing nested deeper: move its images up into "
                        "the class folder, or make it a class folder of its own")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{path}: not an image file (expected one of the suffixes "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    # PIL's decoders signal corrupt data with many exception types (OSError, SyntaxError for
    # a broken PNG chunk, ValueError, EOFError, struct.error, DecompressionBombError, ...).
    try:
        with Image.open(path) as image:
            image.load()  # open() reads only the header; a truncated file fails in the decode
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: cannot read image: {err}") from err
    width, height = image.size
    if min(width, height) < image_size and not allow_upscale:
        raise DataError(f"{path}: {width}x{height} px is smaller than preprocess.image_size = "
                        f"{image_size} on its shorter side; set preprocess.allow_upscale: true "
                        "to enlarge such images")
    image = to_8bit(path, image, channels)
    scale = image_size / min(width, height)
    if scale != 1:
        size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None if scale > 1 else 3.0)
    left = (image.width - image_size) // 2
    top = (image.height - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def to_8bit(path: Path, image: Image.Image, channels: int) -> Image.Image:
    """The image as 8-bit L (channels 1) or RGB (channels 3).

    16-bit and 32-bit integer grey (modes I;16, I;16B, I;16L, I) is scaled from 0-65535 to
    0-255; PIL's own conversion clips it at 255 instead. Transparent pixels are composited onto
    black (`on_black`). 1-bit becomes 0/255; palette, CMYK, YCbCr and the rest convert via PIL.
    """
    if image.mode in ("F", "LAB"):  # PIL converts both without their meaning: float range, L*a*b*
        raise DataError(f"{path}: cannot read image: mode {image.mode} is not supported; save "
                        "it as 8- or 16-bit grey or RGB")
    if image.mode.startswith("I"):
        pixels = np.asarray(image).astype(np.int64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise DataError(f"{path}: cannot read image: mode {image.mode} pixel values "
                            f"{pixels.min()}..{pixels.max()} lie outside the 16-bit range 0..65535")
        image = Image.fromarray(((pixels + 128) // 257).astype(np.uint8))  # round(v * 255 / 65535)
    elif image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        image = on_black(image)
    return image.convert("L" if channels == 1 else "RGB")


def on_black(image: Image.Image) -> Image.Image:
    """RGB of the image composited over black: each channel times alpha, round(c * a / 255).

    This is the premultiplied colour (Porter & Duff 1984), so a fully transparent pixel is 0
    whatever colour it hides; black is also the background of MNIST-style data.
    """
    rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
    rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8))


def load_folder(folder: Path, image_size: int, channels: int, classes: list[str] | None = None,
                allow_upscale: bool = False, bad: BadImages | None = None) -> ImageSet:
    """Load an ImageFolder tree; with `classes` given, its class names must be among them.

    Bad files and empty class folders go to `bad` (default: raise); a class whose files were
    all skipped is left out. No usable image at all is always an error.
    """
    bad = bad or BadImages()
    files, names = find_images(folder, bad)
    arrays, kept = [], []
    for path, name in zip(files, names):
        try:
            arrays.append(load_image(path, image_size, channels, allow_upscale))
        except DataError as err:
            bad.file(path, err)
            continue
        kept.append(name)
    if not arrays:
        raise DataError(f"{folder}: no usable images; all {len(files)} files were bad and skipped")
    for name in sorted(set(names) - set(kept)):
        bad.empty_class(folder / name, "every file was skipped")
    found = sorted(set(kept))
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{folder}: classes {unknown} do not occur in the training images "
                        f"(known: {classes})")
    index = {name: i for i, name in enumerate(classes)}
    labels = torch.tensor([index[n] for n in kept], dtype=torch.int64)
    return ImageSet(torch.from_numpy(np.stack(arrays)), labels, tuple(classes))


def build_datasets(p: PreprocessParams) -> tuple[ImageSet, ImageSet, list[Path]]:
    """The training set, the held-out reference set that evaluation compares samples with, and
    the bad files skipped under `preprocess.on_bad_image: skip` (always empty under `error`)."""
    root = Path(p.data_dir)
    if not root.is_dir():
        raise DataError(f"preprocess.data_dir = '{p.data_dir}': folder not found. Get the default "
                        "data with `uv run python -m stages.get_data`, or point "
                        "preprocess.data_dir at your own ImageFolder tree")
    generator = torch.Generator().manual_seed(p.seed)
    bad = BadImages(p.on_bad_image)
    train_dir = split_folder(root, "preprocess.train_split", p.train_split, "training",
                             'set preprocess.train_split to "" if preprocess.data_dir itself '
                             "holds the class folders")
    train = load_folder(train_dir, p.image_size, p.channels, allow_upscale=p.allow_upscale,
                        bad=bad)
    if p.test_split:
        test_dir = split_folder(root, "preprocess.test_split", p.test_split, "held-out",
                                'set preprocess.test_split to "" (-S preprocess.test_split="") '
                                f"to hold out preprocess.holdout_fraction = {p.holdout_fraction} "
                                "of the training images instead")
        held_out = load_folder(test_dir, p.image_size, p.channels, list(train.classes),
                               allow_upscale=p.allow_upscale, bad=bad)
    else:
        order = torch.randperm(len(train), generator=generator)
        n_held = max(1, round(p.holdout_fraction * len(train)))
        if n_held >= len(train):
            raise DataError(f"preprocess.holdout_fraction = {p.holdout_fraction} leaves no "
                            f"training images out of {len(train)}")
        train, held_out = train.subset(order[n_held:]), train.subset(order[:n_held])
    return (random_subset(train, p.max_train_images or len(train), generator),
            random_subset(held_out, p.max_reference_images, generator), bad.skipped)


def split_folder(root: Path, key: str, split: str, what: str, otherwise: str) -> Path:
    """root/split, checked. A missing folder is an error naming the key that names it and the
    other way (`otherwise`); a linked one is refused, since `dvc add data` would skip it."""
    folder = root / split
    if split and folder.is_symlink():
        problem, fix = link_problem(folder)
        raise DataError(f"{problem}; {fix}")
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} image folder not found ({key} = '{split}'); put the "
                        f"{what} images in {folder}/<class>/<image>, or {otherwise}")
    return folder


def summary(train: ImageSet, reference: ImageSet, p: PreprocessParams,
            skipped: list[Path]) -> str:
    """What the preprocess stage made, for its output; the skipped count only when there is one."""
    size = f"{p.channels}x{p.image_size}x{p.image_size}"
    lines = [f"preprocess: {plural(len(train), 'training image')} and "
             f"{plural(len(reference), 'reference image')}, {size}, "
             f"{plural(len(train.classes), 'class', 'classes')}"]
    if skipped:
        lines.append(f"preprocess: skipped {plural(len(skipped), 'bad file')} "
                     "(preprocess.on_bad_image: skip)")
    return "\n".join(lines)


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
