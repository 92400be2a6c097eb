"""Image folders to compact uint8 tensors, and the conversions between pixels and model space.

Any ImageFolder tree works as data: `<root>/<class>/<image>` (grey or colour, any size and any
format PIL reads). Each image is converted to the configured channel count, its shorter side
resized to `image_size` (bicubic; antialiased when shrinking) and centre-cropped to a square.
The result is an `ImageSet`: uint8 images [N, C, H, W], int64 class labels [N] and class names,
which is all that training and evaluation need and loads in a fraction of a second. A latent set
is an ImageSet of float32 latents [N, c, h, w] instead, an autoencoder's encoding of one
(pipeline/autoencoder_training.py), which a latent-space model trains on.
A file that cannot be used (corrupt, truncated, not an image, smaller than `image_size` unless
upscaling is allowed), an empty class folder and a class folder that is a symbolic link (DVC
would not pin its images) are errors that name them, or with `preprocess.on_bad_image: skip`
warnings and a count of skipped files (`BadImages`).
The model works in [-1, 1] (DDPM, Ho et al. 2020, sec. 3.3: pixels scaled linearly to [-1, 1]).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import PreprocessParams
from pipeline.io import atomic_folder
from pipeline.progress import Progress
from pipeline.sources import Tree, open_tree

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".pbm", ".bmp", ".gif", ".tif",
                  ".tiff", ".webp"}
MAX_LISTED = 20  # skipped files named one line each on stderr; the rest are only counted


class DataError(ValueError):
    """The data folder or an image in it cannot be used."""


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # uint8 [N, C, H, W]; a latent set's float32 latents [N, c, h, w]
    labels: torch.Tensor  # int64 [N], index into `classes`
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def save(self, folder: str | Path) -> None:
        """Write the set as a folder (`SetFolder`), atomically."""
        with SetFolder.create(folder, len(self), tuple(self.images.shape[1:]),
                              self.images.numpy().dtype) as out:
            for row in range(0, len(self), 4096):  # bounded memory for a memory-mapped set too
                out.put(row, self.images[row:row + 4096].numpy())
            out.finish(self.labels.numpy(), self.classes)

    @classmethod
    def load(cls, folder: str | Path, written_by: str = "preprocess") -> ImageSet:
        """The set in `folder`, its images memory-mapped: pages are read when used, so a data
        set larger than memory trains, and copy-on-write (`mmap_mode="c"`), so that torch gets
        a writable array whose writes never reach the file. `written_by`: the stage whose
        output it is, for the error when it is missing."""
        folder = Path(folder)
        if not folder.exists():
            raise DataError(f"{folder}: not found; run the {written_by} stage first (`dvc repro`)")
        images = np.load(folder / IMAGES, mmap_mode="c")
        labels = np.load(folder / LABELS)
        classes = json.loads((folder / CLASSES).read_text())
        return cls(torch.from_numpy(images), torch.from_numpy(labels), tuple(classes))


IMAGES, LABELS, CLASSES = "images.npy", "labels.npy", "classes.json"


class SetFolder:
    """An ImageSet being written: `images.npy` (uint8 [N, C, H, W], or a latent set's float32
    latents), `labels.npy` (int64 [N])
    and `classes.json` (the class names) in a temporary folder beside `folder`, which becomes
    `folder` only when the block succeeds (pipeline.io.atomic_folder).

    Rows are written with `os.pwrite` at their place in the file, in any order, not through a
    memory map: the written pages then sit in the page cache, which the kernel writes back and
    frees, rather than in this process's resident memory, so that the preprocess stage's memory
    does not grow with the data set."""

    def __init__(self, tmp: Path, count: int, shape: tuple[int, ...],
                 dtype: np.dtype = np.dtype(np.uint8)) -> None:
        self.tmp, self.count, self.dtype = tmp, count, dtype
        images = np.lib.format.open_memmap(tmp / IMAGES, mode="w+", dtype=dtype,
                                           shape=(count, *shape))  # the header, and the size
        self.offset, self.row_bytes = images.offset, math.prod(shape) * dtype.itemsize
        del images
        self.fd = os.open(tmp / IMAGES, os.O_WRONLY)

    def put(self, row: int, image: np.ndarray) -> None:
        """Write one image ([C, H, W]) or consecutive ones ([n, C, H, W]) from `row` on."""
        os.pwrite(self.fd, np.ascontiguousarray(image, self.dtype).data,
                  self.offset + row * self.row_bytes)

    @classmethod
    @contextlib.contextmanager
    def create(cls, folder: str | Path, count: int, shape: tuple[int, ...],
               dtype: np.dtype = np.dtype(np.uint8)) -> Iterator[SetFolder]:
        folder = Path(folder)
        if folder.exists():
            shutil.rmtree(folder)  # atomic_folder moves into place only onto nothing
        with atomic_folder(folder) as tmp:
            out = cls(tmp, count, shape, np.dtype(dtype))
            try:
                yield out
            finally:
                os.close(out.fd)

    def finish(self, labels: np.ndarray, classes: tuple[str, ...]) -> None:
        np.save(self.tmp / LABELS, np.asarray(labels, dtype=np.int64))
        (self.tmp / CLASSES).write_text(json.dumps(list(classes)) + "\n")


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


def find_images(folder: Path, bad: BadImages, tree: Tree | None = None
                ) -> tuple[list[Path], list[str]]:
    """The files of an ImageFolder tree and their class names, sorted.

    Classes are the sub-folders; a folder without sub-folders is one class named after it.
    Every file in a class folder is returned, hidden dotfiles (.DS_Store) excepted, so that a
    file which is not an image becomes a bad file when loaded rather than silently ignored.
    Files next to the class folders (README.md, train.csv) are not data; images among them are
    reported as left out (`warn_loose_images`). An empty class folder and a class folder that
    is a symbolic link (which DVC would not pin) go to `bad`. `tree` is where the folder is
    (default: on disk; an `Archive` for the members of a zip or tar).
    """
    tree = tree or Tree(folder)
    if not tree.is_dir(folder):
        raise DataError(f"{folder}: image folder not found")
    entries = visible(tree, folder)
    class_dirs = sorted(d for d in entries if tree.is_dir(d))
    if class_dirs:
        warn_loose_images(tree, folder, entries)
    files, names = [], []
    for class_dir in class_dirs or [folder]:
        if tree.is_symlink(class_dir):
            bad.linked_folder(class_dir)
            continue
        found = sorted(visible(tree, class_dir))
        if class_dirs and not found:
            bad.empty_class(class_dir, "empty class folder")
        files += found
        names += [class_dir.name] * len(found)
    if not files:
        raise DataError(f"{folder}: no images found (expected {folder}/<class>/<image>, "
                        f"with suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, names


def warn_loose_images(tree: Tree, folder: Path, entries: list[Path]) -> None:
    """Say which images next to the class folders are left out: a user who put them there most
    likely meant them as data. Other files there (README.md, train.csv) are left out silently."""
    loose = sorted(p.name for p in entries
                   if tree.is_file(p) and p.suffix.lower() in IMAGE_SUFFIXES)
    if loose:
        names = loose[0] if len(loose) == 1 else f"{loose[0]} ... {loose[-1]}"
        warn(f"{folder}: left out {plural(len(loose), 'image file')} beside the class folders "
             f"({names}); only <class>/<image> is read, so files next to class folders are not "
             "data: move them into a class folder")


def plural(count: int, noun: str, nouns: str = "") -> str:
    """'1 class', '2 classes', '0 files': the count with the noun that reads right."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def visible(tree: Tree, folder: Path) -> list[Path]:
    return [p for p in tree.iterdir(folder) if not p.name.startswith(".")]


def load_image(path: Path, image_size: int, channels: int,
               allow_upscale: bool = False) -> np.ndarray:
    """The image file at `path` as `decode_image` makes it."""
    data = None if path.is_dir() else path.read_bytes()
    return decode_image(path, data, Shape(image_size, channels, allow_upscale))


@dataclass(frozen=True)
class Shape:
    """What each image becomes: `channels` x `image_size` x `image_size` uint8 pixels."""

    image_size: int
    channels: int
    allow_upscale: bool = False


def decode_image(path: Path, data: bytes | None, shape: Shape) -> np.ndarray:
    """The image file `path`, whose bytes are `data` (None: it is a folder), as uint8
    [C, image_size, image_size]: converted, resized, centre-cropped.

    Raises DataError naming the file if it is a folder (nested in a class folder) or not an
    image, cannot be decoded in full, has a mode without a defined 8-bit meaning, or (unless
    `allow_upscale`) is smaller than `image_size` on its shorter side.
    """
    image_size, channels = shape.image_size, shape.channels
    if data is None:
        raise DataError(f"{path}: a folder inside the class folder {path.parent}; only "
                        "<class>/<image> is read, nothing nested deeper: move its images up into "
                        "the class folder, or make it a class folder of its own")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{path}: not an image file (expected one of the suffixes "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    # PIL's decoders signal corrupt data with many exception types (OSError, SyntaxError for
    # a broken PNG chunk, ValueError, EOFError, struct.error, DecompressionBombError, ...).
    try:
        with Image.open(NamedBytes(data, path)) as image:
            image.load()  # open() reads only the header; a truncated file fails in the decode
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: cannot read image: {err}") from err
    width, height = image.size
    if min(width, height) < image_size and not shape.allow_upscale:
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


class NamedBytes(io.BytesIO):
    """An image file's bytes, shown as its path: PIL's errors name the file object they read."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(data)
        self.path = path

    def __repr__(self) -> str:
        return repr(str(self.path))


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
    """Load an ImageFolder tree into memory (evaluate's samples); with `classes` given, its class
    names must be among them.

    Bad files and empty class folders go to `bad` (default: raise); a class whose files were
    all skipped is left out. No usable image at all is always an error.
    """
    bad = bad or BadImages()
    shape = Shape(image_size, channels, allow_upscale)
    files, names = find_images(folder, bad)
    images = np.empty((len(files), channels, image_size, image_size), np.uint8)

    def put(i: int, array: np.ndarray) -> None:
        images[i] = array

    keep = decode_into(Tree(folder), files, shape, bad, 1, put)
    labels, classes = label(folder, names, keep, classes, bad)
    return ImageSet(torch.from_numpy(images[keep]), torch.from_numpy(labels[keep]), classes)


def label(folder: Path, names: list[str], keep: np.ndarray, classes: list[str] | None,
          bad: BadImages) -> tuple[np.ndarray, tuple[str, ...]]:
    """The label of each file (-1 for the skipped ones) and the class names: those given, else
    every class with a kept file. A class whose files were all skipped goes to `bad`; with
    `classes` given, a kept file of another class is an error."""
    if not keep.any():
        raise DataError(f"{folder}: no usable images; all {len(names)} files were bad and skipped")
    kept = {n for n, k in zip(names, keep) if k}
    for name in sorted(set(names) - kept):
        bad.empty_class(folder / name, "every file was skipped")
    classes = classes or sorted(kept)
    unknown = sorted(kept - set(classes))
    if unknown:
        raise DataError(f"{folder}: classes {unknown} do not occur in the training images "
                        f"(known: {classes})")
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[n] if k else -1 for n, k in zip(names, keep)], np.int64)
    return labels, tuple(classes)


CHUNK = 64  # images per task sent to a worker process


def decode_into(tree: Tree, files: list[Path], shape: Shape, bad: BadImages, workers: int,
                put, show_progress: bool = False) -> np.ndarray:
    """Decode `files` in `workers` processes and hand each image to `put(index, array)`, in the
    order the source stores them; return which files were kept (a bool per file).

    At most a few chunks per worker are in flight, so memory stays bounded by those, whatever
    the number of images. A bad file goes to `bad`, in the same order for any worker count.
    """
    keep = np.zeros(len(files), bool)
    chunks = batched(((i, files[i], data) for i, data in tree.read(files)), CHUNK)
    progress = Progress(len(files), "preprocess", "image") if show_progress else None
    done = 0
    for chunk in parallel_map(decode_chunk, chunks, shape, workers):
        for i, array in chunk:
            if isinstance(array, DataError):
                bad.file(files[i], array)
            else:
                put(i, array)
                keep[i] = True
        done += len(chunk)
        if progress:
            progress.update(done)
    return keep


def decode_chunk(chunk: list[tuple[int, Path, bytes | None]],
                 shape: Shape) -> list[tuple[int, np.ndarray | DataError]]:
    """One worker's task: decode each file, or keep its DataError to report in the parent."""
    out = []
    for i, path, data in chunk:
        try:
            out.append((i, decode_image(path, data, shape)))
        except DataError as err:
            out.append((i, err))
    return out


def batched(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def parallel_map(fn, items: Iterator, arg, workers: int) -> Iterator:
    """fn(item, arg) for each item, in order, in `workers` processes (1: in this one).

    Unlike Pool.imap, which reads its whole input ahead, at most 4 tasks per worker are
    submitted before their results are taken: the input is the images' bytes."""
    if workers == 1:
        yield from (fn(item, arg) for item in items)
        return
    with multiprocessing.Pool(workers) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item, arg)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def worker_count(workers: int) -> int:
    """`preprocess.workers`, with 0 meaning every core this process may run on."""
    return workers or len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Listing:
    """The files of the training split, then those of the test split (if there is one)."""

    files: list[Path]
    names: list[str]  # each file's class
    train_files: int  # files[:train_files] are the training split's
    train_folder: Path
    test_folder: Path | None  # None: the held-out set is drawn from the training split


class Redo(Exception):
    """Bad images were skipped: draw the sets again without them (`build_datasets`)."""


def build_datasets(p: PreprocessParams, train_out: Path, reference_out: Path,
                   show_progress: bool = False) -> tuple[ImageSet, ImageSet, list[Path]]:
    """Write the training set and the held-out reference set that evaluation compares samples
    with to their folders and return them, with the bad files skipped under
    `preprocess.on_bad_image: skip` (always empty under `error`).

    The hold-out split and the random subsets are drawn over the listed files, so each image is
    decoded once, by a worker, and written straight into its row of the memory-mapped output:
    memory does not grow with the data set, and the outputs are the same bytes for any
    `preprocess.workers`. A skipped bad image would leave a gap, so then the sets are drawn
    again over the files without it and written anew (each round finds at least one more bad
    file): the result is as if the bad files were not there, at the cost of a second pass only
    for data with bad files.
    """
    root = Path(p.data_dir)
    if not root.exists():
        raise DataError(f"preprocess.data_dir = '{p.data_dir}': folder not found. Get the default "
                        "data with `uv run python -m stages.get_data`, or point "
                        "preprocess.data_dir at your own ImageFolder tree (or a .zip or .tar.gz "
                        "of one)")
    tree = open_tree(root)
    bad = BadImages(p.on_bad_image)
    listing = list_files(tree, root, p, bad)
    excluded = np.zeros(len(listing.files), bool)
    while True:
        try:
            write_sets(tree, listing, excluded, p, bad, (train_out, reference_out), show_progress)
            return ImageSet.load(train_out), ImageSet.load(reference_out), bad.skipped
        except Redo:
            excluded |= np.isin(listing.files, bad.skipped)


def write_sets(tree: Tree, listing: Listing, excluded: np.ndarray, p: PreprocessParams,
               bad: BadImages, outs: tuple[Path, Path], show_progress: bool) -> None:
    """Draw the sets over the files not `excluded`, decode them into their folders; Redo when a
    file was skipped (the folders are then not written)."""
    n = listing.train_files
    names = np.array(listing.names, dtype=object)
    labels, classes = label(listing.train_folder, list(names[:n]), ~excluded[:n], None, bad)
    if listing.test_folder:
        held, _ = label(listing.test_folder, list(names[n:]), ~excluded[n:], list(classes), bad)
        labels = np.concatenate([labels, held])
    index = draw(np.flatnonzero(~excluded), n, listing.test_folder is not None, p)
    wanted = np.concatenate(index)
    size = (p.channels, p.image_size, p.image_size)
    skipped = len(bad.skipped)
    with (SetFolder.create(outs[0], len(index[0]), size) as train,
          SetFolder.create(outs[1], len(index[1]), size) as reference):
        sets = [train] * len(index[0]) + [reference] * len(index[1])
        rows = [*range(len(index[0])), *range(len(index[1]))]

        def put(i: int, array: np.ndarray) -> None:
            sets[i].put(rows[i], array)

        decode_into(tree, [listing.files[i] for i in wanted], Shape(p.image_size, p.channels,
                    p.allow_upscale), bad, worker_count(p.workers), put, show_progress)
        if len(bad.skipped) > skipped:
            raise Redo
        train.finish(labels[index[0]], classes)
        reference.finish(labels[index[1]], classes)


def draw(usable: np.ndarray, train_files: int, test_split: bool,
         p: PreprocessParams) -> tuple[np.ndarray, np.ndarray]:
    """The file indices of the training set and of the reference set, in their order: the
    seeded hold-out split (without a test split) and random subsets, as `usable` allows."""
    generator = torch.Generator().manual_seed(p.seed)
    train = torch.from_numpy(usable[usable < train_files])
    if test_split:
        held = torch.from_numpy(usable[usable >= train_files])
    else:
        order = train[torch.randperm(len(train), generator=generator)]
        n_held = max(1, round(p.holdout_fraction * len(train)))
        if n_held >= len(train):
            raise DataError(f"preprocess.holdout_fraction = {p.holdout_fraction} leaves no "
                            f"training images out of {len(train)}")
        train, held = order[n_held:], order[:n_held]
    train = random_subset(train, p.max_train_images or len(train), generator)
    held = random_subset(held, p.max_reference_images, generator)
    return train.numpy(), held.numpy()


def list_files(tree: Tree, root: Path, p: PreprocessParams, bad: BadImages) -> Listing:
    """The files of the training split and of the test split, checked (`find_images`)."""
    train_dir = split_folder(tree, root, "preprocess.train_split", p.train_split, "training",
                             'set preprocess.train_split to "" if preprocess.data_dir itself '
                             "holds the class folders")
    files, names = find_images(train_dir, bad, tree)
    count, test_dir = len(files), None
    if p.test_split:
        test_dir = split_folder(tree, root, "preprocess.test_split", p.test_split, "held-out",
                                'set preprocess.test_split to "" (-S preprocess.test_split="") '
                                f"to hold out preprocess.holdout_fraction = {p.holdout_fraction} "
                                "of the training images instead")
        test_files, test_names = find_images(test_dir, bad, tree)
        files, names = files + test_files, names + test_names
    return Listing(files, names, count, train_dir, test_dir)


def split_folder(tree: Tree, root: Path, key: str, split: str, what: str, otherwise: str) -> Path:
    """root/split, checked. A missing folder is an error naming the key that names it and the
    other way (`otherwise`); a linked one is refused, since `dvc add data` would skip it."""
    folder = root / split
    if split and tree.is_symlink(folder):
        problem, fix = link_problem(folder)
        raise DataError(f"{problem}; {fix}")
    if not tree.is_dir(folder):
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


def random_subset(rows: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """At most `size` of the rows, drawn without replacement, in their original order."""
    if len(rows) <= size:
        return rows
    return rows[torch.randperm(len(rows), generator=generator)[:size].sort().values]


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
