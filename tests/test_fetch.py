"""Getting data.dvc's data on a fresh clone: mirror, real HTTP download, DVC verification."""

import functools
import hashlib
import http.server
import io
import subprocess
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
import yaml

from pipeline import fetch
from pipeline.data import DataError
from pipeline.fetch import MIRROR_ENV, Source, get_data, repack, write_zip

FILES = {"train/0/1.png": b"zero", "train/1/2.png": b"one", "test/0/3.png": b"three",
         "README.md": b"tiny"}
KEEP = ("train", "test", "README.md")


def make_archive(path: Path, files: dict[str, bytes], prefix: str = "./") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in {**files, "extra.txt": b"not part of the data set"}.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def packed(data: Path) -> dict[str, bytes]:
    """What data/ holds: the members of data/images.zip, and nothing beside it."""
    assert [p.name for p in data.iterdir()] == ["images.zip"]
    return members(data / "images.zip")


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def edit(repo: Path) -> None:
    """Change the workspace's data, as a user's edit would."""
    files = {**packed(repo / "data"), "README.md": b"my edit"}
    write_packed(repo / "data", files)


def write_packed(data: Path, files: dict[str, bytes]) -> None:
    data.mkdir(exist_ok=True)
    write_zip(files, data / "images.zip")


@pytest.mark.parametrize("prefix", ["./", "mnist-pngs-main/"])
def test_repack_keeps_the_data_set_and_drops_a_leading_folder(tmp_path, prefix):
    archive = make_archive(tmp_path / "a.tar.gz", FILES, prefix)
    repack(archive, KEEP, tmp_path / "a.zip")
    assert members(tmp_path / "a.zip") == FILES


def test_repack_reports_missing_members(tmp_path):
    archive = make_archive(tmp_path / "a.tar.gz", {"train/x.png": b"x"})
    with pytest.raises(DataError, match="does not contain test, README.md"):
        repack(archive, KEEP, tmp_path / "a.zip")


def test_repack_refuses_a_member_outside_the_data_set(tmp_path):
    archive = make_archive(tmp_path / "a.tar.gz", {**FILES, "train/../../x.png": b"x"})
    with pytest.raises(DataError, match="train/../../x.png points outside"):
        repack(archive, KEEP, tmp_path / "a.zip")


def test_write_zip_is_the_same_bytes_for_the_same_files_in_any_order(tmp_path):
    # Sorted by path components, as DVC-pinned MNIST was packed: "a/b" before "a-b" although
    # "-" sorts before "/" as a character.
    files = {"a-b/1.png": b"1", "a/b/2.png": b"2", "a/10.png": b"3", "README.md": b"4"}
    write_zip(files, tmp_path / "one.zip")
    write_zip(dict(reversed(files.items())), tmp_path / "two.zip")
    assert (tmp_path / "one.zip").read_bytes() == (tmp_path / "two.zip").read_bytes()
    assert list(members(tmp_path / "one.zip")) == ["README.md", "a/10.png", "a/b/2.png", "a-b/1.png"]


@pytest.fixture
def served(tmp_path):
    """A real HTTP server on loopback serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def tiny_repo(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """A git + DVC repository whose data.dvc pins `files` (then removed, as on a fresh clone)."""
    repo = tmp_path / "repo"
    repo.mkdir(parents=True)
    write_packed(repo / "data", files)
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "data"]):
        subprocess.run(command, cwd=repo, check=True)
    subprocess.run(["rm", "-rf", "data", ".dvc/cache"], cwd=repo, check=True)
    return repo


def dvc_status(repo: Path) -> str:
    return subprocess.run(["dvc", "status", "data.dvc"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout


def pin(repo: Path) -> str:
    """The hash data.dvc pins."""
    return yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]


def use_source(monkeypatch, archive: Path, md5: str, url: str = "", name: str = "mnist") -> None:
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(fetch.SOURCES, name, Source(archive.name, digest, url, KEEP, md5))


def test_mirror_fills_data_exactly_as_data_dvc_pins(tmp_path, monkeypatch):
    repo = tiny_repo(tmp_path, FILES)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    use_source(monkeypatch, make_archive(mirror / "set.tar.gz", FILES), pin(repo))
    assert "verified" in get_data(repo_root=repo, mirror=str(mirror))
    assert packed(repo / "data") == FILES
    assert "up to date" in dvc_status(repo)  # data and cache match data.dvc
    assert "already matches" in get_data(repo_root=repo, mirror=str(mirror))


def test_download_path_over_real_http(tmp_path, monkeypatch, served):
    www, url = served
    repo = tiny_repo(tmp_path, FILES)
    archive = make_archive(www / "main.tar.gz", FILES, prefix="mnist-pngs-main/")
    use_source(monkeypatch, archive, pin(repo), f"{url}/main.tar.gz")
    get_data(repo_root=repo, mirror=None)
    assert packed(repo / "data") == FILES and "up to date" in dvc_status(repo)


def test_data_that_differs_from_data_dvc_is_refused_and_data_dvc_kept(tmp_path, monkeypatch):
    repo = tiny_repo(tmp_path, FILES)
    pinned = (repo / "data.dvc").read_text()
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    use_source(monkeypatch, make_archive(mirror / "set.tar.gz", {**FILES, "README.md": b"other"}),
               pin(repo))
    with pytest.raises(DataError, match="does not match data.dvc"):
        get_data(repo_root=repo, mirror=str(mirror))
    assert (repo / "data.dvc").read_text() == pinned


def test_mirror_checksum_is_verified(tmp_path, monkeypatch):
    repo = tiny_repo(tmp_path, FILES)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive = make_archive(mirror / "set.tar.gz", FILES)
    monkeypatch.setitem(fetch.SOURCES, "mnist", Source(archive.name, "0" * 64, "", KEEP, pin(repo)))
    with pytest.raises(DataError, match="sha256"):
        get_data(repo_root=repo, mirror=str(mirror))
    assert not (repo / "data").exists()


def test_neither_mirror_nor_internet_says_both_ways(tmp_path, monkeypatch, served):
    _, url = served
    repo = tiny_repo(tmp_path, FILES)
    monkeypatch.setitem(fetch.SOURCES, "mnist", Source("absent.tar.gz", "0" * 64,
                                                        f"{url}/absent.tar.gz", KEEP, pin(repo)))
    with pytest.raises(DataError) as err:
        get_data(repo_root=repo, mirror=None)
    assert MIRROR_ENV in str(err.value) and "internet" in str(err.value)
    assert "404" in str(err.value)
    assert not (repo / "data").exists()


def test_changed_workspace_data_is_not_replaced_without_force(tmp_path, monkeypatch):
    repo = tiny_repo(tmp_path, FILES)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    use_source(monkeypatch, make_archive(mirror / "set.tar.gz", FILES), pin(repo))
    get_data(repo_root=repo, mirror=str(mirror))
    edit(repo)
    with pytest.raises(DataError, match="--force"):
        get_data(repo_root=repo, mirror=str(mirror))
    assert packed(repo / "data")["README.md"] == b"my edit"
    get_data(repo_root=repo, mirror=str(mirror), force=True)
    assert packed(repo / "data") == FILES


# --- get_data mnist after another set was pinned: MNIST back, data.dvc as shipped ---

OTHER = {"train/cat/1.jpg": b"meow", "test/cat/2.jpg": b"purr", "README.md": b"another set"}


def switched(tmp_path: Path, monkeypatch) -> tuple[Path, str, Path]:
    """A repository with MNIST (here FILES) fetched, then switched to cifar10 (here OTHER)."""
    repo = tiny_repo(tmp_path, FILES)
    shipped = (repo / "data.dvc").read_text()
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    use_source(monkeypatch, make_archive(mirror / "set.tar.gz", FILES), pin(repo))
    other = tiny_repo(tmp_path / "other", OTHER)  # only to learn the hash `dvc add` gives OTHER
    use_source(monkeypatch, make_archive(mirror / "other.tar.gz", OTHER), pin(other),
               name="cifar10")
    get_data(repo_root=repo, mirror=str(mirror))
    get_data("cifar10", repo_root=repo, mirror=str(mirror))
    assert packed(repo / "data") == OTHER and (repo / "data.dvc").read_text() != shipped
    return repo, shipped, mirror


def test_mnist_after_another_set_brings_back_mnist_and_the_shipped_data_dvc(tmp_path,
                                                                          monkeypatch):
    repo, shipped, mirror = switched(tmp_path, monkeypatch)
    message = get_data("mnist", repo_root=repo, mirror=str(mirror))
    assert packed(repo / "data") == FILES
    assert (repo / "data.dvc").read_text() == shipped  # byte for byte: git shows no change
    assert "up to date" in dvc_status(repo)
    assert message == (f"data/ holds mnist again, and data.dvc pins it as this repository ships "
                       f"it (md5 {pin(repo)}; commit data.dvc if `git status` shows it changed). "
                       "The data it replaced (cifar10) stays in the DVC cache: `python -m "
                       "stages.get_data cifar10` brings it back")


def test_switching_back_never_loses_changed_data_or_an_uncommitted_pin(tmp_path, monkeypatch):
    repo, shipped, mirror = switched(tmp_path, monkeypatch)
    edit(repo)
    with pytest.raises(DataError, match=r"data/ differs from data.dvc .*, which pins cifar10, "
                       r"not mnist; keep the changes with `dvc add data`"):
        get_data("mnist", repo_root=repo, mirror=str(mirror))
    assert packed(repo / "data")["README.md"] == b"my edit"
    subprocess.run(["dvc", "add", "-q", "data"], cwd=repo, check=True)  # now your own data set
    with pytest.raises(DataError, match=r"data.dvc pins data that is not one of the mirrored sets "
                       rf"\(md5 {pin(repo)}\) and is not committed in git"):
        get_data("mnist", repo_root=repo, mirror=str(mirror))
    assert packed(repo / "data")["README.md"] == b"my edit"
    own = pin(repo)
    subprocess.run(["git", "add", "data.dvc", ".gitignore"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "own"],
                   cwd=repo, check=True)
    message = get_data("mnist", repo_root=repo, mirror=str(mirror))  # git keeps the pin: safe
    assert packed(repo / "data") == FILES and (repo / "data.dvc").read_text() == shipped
    assert message.endswith(f"The data it replaced (md5 {own}) stays in the DVC cache: "
                            "`git checkout data.dvc && dvc checkout data.dvc` brings it back")
    subprocess.run(["git", "checkout", "-q", "data.dvc"], cwd=repo, check=True)
    subprocess.run(["dvc", "checkout", "-q", "data.dvc"], cwd=repo, check=True)
    assert packed(repo / "data")["README.md"] == b"my edit"  # it did come back
