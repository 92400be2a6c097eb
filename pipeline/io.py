"""Safe file I/O: atomic, durable writes, and tensor files loaded without running their code.

Every output goes to a temporary file in the same folder, is flushed to disk (fsync), and is moved
into place with `os.replace`, which is atomic on POSIX and Windows; the folder is then synced so
the rename itself survives a power loss. An interrupted stage (a kill, a full disk) therefore never
leaves a half-written checkpoint, tensor file, image or metrics file behind: the path holds either
the old file or the whole new one.

Tensor files are read with `torch.load(..., weights_only=True)`, which unpickles only tensors and
plain containers. A file that holds other pickled objects (which could run code when loaded, e.g.
a crafted checkpoint) is refused with `UnsafeFileError`. What the project writes for others (the
trained model's weights) is a safetensors file instead: tensors and string metadata, no pickle.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from PIL import Image

_UMASK = os.umask(0)
os.umask(_UMASK)


def project_root() -> Path:
    """The main repository's root: DVC_ROOT under DVC (which points at the main repository also
    in the temporary copies of `dvc exp run --temp` and queued experiments), else the current
    folder. What every kind of run shares lives here: the MLflow store and the checkpoints."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


class UnsafeFileError(ValueError):
    """A tensor file holds pickled objects other than tensors and plain containers."""


class CorruptFileError(ValueError):
    """A tensor file is truncated or damaged."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it onto `path` only if the block succeeds."""
    path = Path(path)
    tmp = temp_file_beside(path)
    try:
        yield tmp
        # The usual permissions again: a writer may have made the file anew (safetensors' 0600).
        os.chmod(tmp, 0o666 & ~_UMASK)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a new temporary folder beside `path`; move it onto `path` only if the block succeeds,
    so a failure leaves nothing half-written. `path` must not exist, or be an empty folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        for inside in sorted(tmp.rglob("*"), reverse=True):  # files before their folders
            fsync(inside)
        fsync(tmp)
        os.rename(tmp, path)
        fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def temp_file_beside(path: Path) -> Path:
    """A new empty file in `path`'s folder (made if missing), named after `path`, with the usual
    permissions (mkstemp's are 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    return Path(tmp)


def fsync(path: str | Path) -> None:
    """Flush a file's or a folder's contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_torch(obj: Any, path: str | Path) -> None:
    """Written through a file object: torch names the archive's records after the file it is
    given by name, here a random temporary one, so equal objects gave files of other bytes (and
    DVC saw a changed output where nothing had changed)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        torch.save(obj, file)


def load_torch(path: str | Path) -> Any:
    """A file written by save_torch, on the CPU; refuses files that could run code when loaded.

    Raises UnsafeFileError for pickled objects beyond tensors and plain containers, and
    CorruptFileError for a file that is truncated or not a tensor file at all.
    """
    try:
        # A handle, not the path: torch.load reads a path ending in .safetensors as safetensors,
        # and a torch file is a torch file whatever its name.
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        found = [line for line in str(err).splitlines() if "GLOBAL" in line]
        if found:
            raise UnsafeFileError(
                f"{path}: refused to load: it holds pickled Python objects, not only tensors, "
                f"and loading it could run arbitrary code ({found[0].strip()})") from None
        raise CorruptFileError(f"{path}: not a readable tensor file (bad pickle data)") from None
    except Exception as err:  # torch reports damage as RuntimeError, EOFError, KeyError, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CorruptFileError(f"{path}: not a readable tensor file ({reason})") from None


def save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                     path: str | Path) -> None:
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (on the CPU) and the metadata of a safetensors file; CorruptFileError for a
    file that is truncated or not a safetensors file."""
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as err:  # SafetensorError, and OSError for a folder
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CorruptFileError(f"{path}: not a readable safetensors file ({reason})") from None


def save_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_image(image: Any, path: str | Path) -> None:
    """Save a PIL image; the format comes from `path`'s suffix, not the temporary name."""
    path = Path(path)
    check_image_path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])


def check_image_path(path: Path) -> None:
    """Raise ValueError naming `path` unless an image can be written there: before the work that
    makes the image, so that a typo costs nothing."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name an image file in it, e.g. {path / 'grid.png'}")
    if path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"{path}: not an image file name; end it in .png or .jpg")
    folder = next((p for p in path.absolute().parents if p.exists()), None)
    if folder is None or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write there ({folder} is not a writable folder)")
