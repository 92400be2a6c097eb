"""Where images are stored: a folder, or a `.zip` / `.tar` / `.tar.gz` of an ImageFolder tree.

An archive is read in place, without unpacking: it is the form in which data sets are shipped
(EDM stores its data sets as zips), and one file is what DVC checks fastest (a folder of 70,000
images costs seconds of hashing on every `dvc status`). A member of an archive is named like a
file below it, `data/images.zip/train/3/17.png`, so that every message about a bad image reads
the same whether the images are loose files or archive members.

`Tree` answers the questions that reading an ImageFolder layout asks (is this a folder, a link,
what is in it) for all three kinds, and `read` yields the bytes of chosen files in the order in
which they are stored: a tar.gz can only be read front to back.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
FILE, FOLDER, LINK = "file", "folder", "link"


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


class Tree:
    """A folder on disk. `Archive` answers the same questions for the members of an archive."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def exists(self, path: Path) -> bool:
        return path.exists()

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def is_file(self, path: Path) -> bool:
        return path.is_file()

    def is_symlink(self, path: Path) -> bool:
        return path.is_symlink()

    def iterdir(self, path: Path) -> list[Path]:
        return list(path.iterdir())

    def read(self, files: list[Path]) -> Iterator[tuple[int, bytes | None]]:
        """(index into `files`, its bytes) for each file, in storage order; None for a folder
        (nested in a class folder, which is a bad file, not data)."""
        for i, path in enumerate(files):
            yield i, None if path.is_dir() else path.read_bytes()


class Archive(Tree):
    """The members of a zip or tar(.gz) file as the paths `<archive>/<member>`.

    Folders that an archive implies but does not list (`train/3/` of `train/3/17.png`) exist;
    links (tar symbolic and hard links) are kept as links, so that a linked class folder is
    refused as it is on disk, and a linked file is a bad file (its target is not in DVC's hash
    of this one file only by accident).
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.kinds: dict[Path, str] = {root: FOLDER}
        self.children: dict[Path, set[Path]] = {}
        for name, kind in self.members():
            self.add(root / member_name(name), kind)

    def members(self) -> list[tuple[str, str]]:
        if self.root.name.lower().endswith(".zip"):
            with zipfile.ZipFile(self.root) as z:
                return [(i.filename, FOLDER if i.is_dir() else FILE) for i in z.infolist()]
        with tarfile.open(self.root) as tar:
            return [(m.name, FOLDER if m.isdir() else FILE if m.isfile() else LINK)
                    for m in tar.getmembers()]

    def add(self, path: Path, kind: str) -> None:
        if path == self.root or ".." in path.relative_to(self.root).parts:
            return  # `./` itself, or a name that would point outside the archive: not data
        self.kinds[path] = kind
        while path != self.root:
            self.children.setdefault(path.parent, set()).add(path)
            path = path.parent
            self.kinds.setdefault(path, FOLDER)

    def exists(self, path: Path) -> bool:
        return path in self.kinds

    def is_dir(self, path: Path) -> bool:
        return self.kinds.get(path) == FOLDER

    def is_file(self, path: Path) -> bool:
        return self.kinds.get(path) == FILE

    def is_symlink(self, path: Path) -> bool:
        return self.kinds.get(path) == LINK

    def iterdir(self, path: Path) -> list[Path]:
        return sorted(self.children.get(path, ()))

    def read(self, files: list[Path]) -> Iterator[tuple[int, bytes | None]]:
        index = {self.name(path): i for i, path in enumerate(files)}
        for i, path in enumerate(files):
            if not self.is_file(path):
                yield i, None
        if self.root.name.lower().endswith(".zip"):
            yield from self.read_zip(index)
        else:
            yield from self.read_tar(index)

    def name(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def read_zip(self, index: dict[str, int]) -> Iterator[tuple[int, bytes]]:
        with zipfile.ZipFile(self.root) as z:
            members = sorted((i for i in z.infolist()
                              if not i.is_dir() and member_name(i.filename) in index),
                             key=lambda i: i.header_offset)
            for info in members:
                yield index[member_name(info.filename)], z.read(info)

    def read_tar(self, index: dict[str, int]) -> Iterator[tuple[int, bytes]]:
        with tarfile.open(self.root, "r|*") as tar:  # a stream: one pass, front to back
            for member in tar:
                if member.isfile() and member_name(member.name) in index:
                    yield index[member_name(member.name)], tar.extractfile(member).read()


def member_name(name: str) -> str:
    """`train/3/17.png` for `./train/3/17.png` and `train/3/17.png`; `train/3` for `train/3/`."""
    return PurePosixPath(name.strip("/")).as_posix()


def open_tree(path: Path) -> Tree:
    return Archive(path) if is_archive(path) and path.is_file() else Tree(path)
