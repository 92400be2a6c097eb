"""Image folders -> uint8 tensors: layout, resize/crop, splits, bad images, pixel conversions."""

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import PreprocessParams
from pipeline.data import (MAX_LISTED, BadImages, DataError, ImageSet, build_datasets,
                           find_images, grid_image, load_folder, load_image, to_model_range,
                           to_uint8)

ROOT = Path(__file__).resolve().parents[1]


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def build(p: PreprocessParams) -> tuple[ImageSet, ImageSet, list[Path]]:
    """build_datasets, writing its sets beside the data folder."""
    out = Path(f"{p.data_dir}-out")
    return build_datasets(p, out / "train", out / "reference")


def folder(root: Path, counts: dict[str, int], size: int = 6) -> Path:
    """An ImageFolder tree whose image i of (digit-named) class c has every pixel = 10 * c + i."""
    for name, n in counts.items():
        for i in range(n):
            save(root / name / f"{i}.png", np.full((size, size), 10 * int(name) + i, np.uint8))
    return root


def test_load_image_resizes_shorter_side_and_centre_crops(tmp_path):
    # 64 wide, 32 high, the middle half white. Shrinking to 16 px high halves both sides
    # (32 x 16); the centre crop keeps columns 8-23, the white middle, and no black.
    array = np.zeros((32, 64), np.uint8)
    array[:, 16:48] = 255
    save(tmp_path / "wide.png", array)
    out = load_image(tmp_path / "wide.png", image_size=16, channels=1)
    assert out.shape == (1, 16, 16) and out.dtype == np.uint8
    assert out[:, :, 1:-1].min() >= 250  # the outer columns may catch a little filter ringing


def test_load_image_converts_channels(tmp_path):
    rgb = np.zeros((5, 5, 3), np.uint8)
    rgb[..., 0] = 200  # pure red
    save(tmp_path / "red.png", rgb)
    colour = load_image(tmp_path / "red.png", 5, channels=3)
    grey = load_image(tmp_path / "red.png", 5, channels=1)
    assert colour.shape == (3, 5, 5) and (colour[0] == 200).all() and (colour[1:] == 0).all()
    assert grey.shape == (1, 5, 5)
    assert (grey == round(200 * 299 / 1000)).all()  # ITU-R 601-2 luma, as PIL converts


def test_find_images_classes_and_flat_folder(tmp_path):
    files, names = find_images(folder(tmp_path / "a", {"7": 2, "3": 3}), BadImages())
    assert names == ["3"] * 3 + ["7"] * 2
    assert files[0] == tmp_path / "a" / "3" / "0.png" and len(files) == 5
    save(tmp_path / "flat" / "x.png", np.zeros((3, 3), np.uint8))
    assert find_images(tmp_path / "flat", BadImages())[1] == ["flat"]


def test_missing_and_empty_folders_name_the_path(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        find_images(tmp_path / "nowhere", BadImages())
    (tmp_path / "empty").mkdir()
    for policy in ("error", "skip"):  # an empty data set is an error in either mode
        with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: no images found"):
            find_images(tmp_path / "empty", BadImages(policy))


def test_build_datasets_with_test_split(tmp_path):
    folder(tmp_path / "train", {"0": 3, "1": 2})
    folder(tmp_path / "test", {"1": 1})
    p = PreprocessParams(data_dir=str(tmp_path), image_size=6, channels=1)
    train, reference, skipped = build(p)
    assert train.images.shape == (5, 1, 6, 6) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 0, 0, 1, 1]
    assert reference.classes == ("0", "1") and reference.labels.tolist() == [1]
    assert reference.images[0].unique().tolist() == [10]  # class index 1, image 0
    assert skipped == []


def test_test_split_with_an_unknown_class_is_refused(tmp_path):
    folder(tmp_path / "train", {"0": 1})
    folder(tmp_path / "test", {"9": 1})
    with pytest.raises(DataError, match=r"\['9'\]"):
        build(PreprocessParams(data_dir=str(tmp_path), image_size=6))


def test_holdout_split_is_disjoint_seeded_and_capped(tmp_path):
    folder(tmp_path / "all", {"0": 10, "1": 10})
    p = PreprocessParams(data_dir=str(tmp_path / "all"), train_split="", test_split="",
                         holdout_fraction=0.25, image_size=6, max_train_images=12)
    train, reference, _ = build(p)
    assert len(reference) == 5 and len(train) == 12
    pixel_values = lambda s: {int(v) for v in s.images[:, 0, 0, 0]}  # noqa: E731
    assert not pixel_values(train) & pixel_values(reference)  # every image is unique
    again_train, again_reference, _ = build(p)
    assert torch.equal(train.images, again_train.images)
    assert torch.equal(reference.images, again_reference.images)


def test_missing_data_dir_says_how_to_get_data(tmp_path):
    with pytest.raises(DataError, match=r"preprocess.data_dir.*stages.get_data"):
        build(PreprocessParams(data_dir=str(tmp_path / "none")))


def test_missing_split_folders_name_their_key_and_what_else_to_set(tmp_path):
    folder(tmp_path / "train", {"0": 2})
    p = PreprocessParams(data_dir=str(tmp_path), image_size=6)
    with pytest.raises(DataError) as err:
        build(p)
    assert str(err.value) == (
        f"{tmp_path / 'test'}: held-out image folder not found (preprocess.test_split = 'test'); "
        f"put the held-out images in {tmp_path / 'test'}/<class>/<image>, or set "
        'preprocess.test_split to "" (-S preprocess.test_split="") to hold out '
        "preprocess.holdout_fraction = 0.1 of the training images instead")
    with pytest.raises(DataError) as err:
        build(PreprocessParams(data_dir=str(tmp_path), train_split="all", image_size=6))
    assert str(err.value) == (
        f"{tmp_path / 'all'}: training image folder not found (preprocess.train_split = 'all'); "
        f"put the training images in {tmp_path / 'all'}/<class>/<image>, or set "
        'preprocess.train_split to "" if preprocess.data_dir itself holds the class folders')


def test_linked_split_folder_is_refused(tmp_path):
    folder(tmp_path / "elsewhere", {"0": 2})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    p = PreprocessParams(data_dir=str(tmp_path / "data"), test_split="", image_size=6)
    with pytest.raises(DataError, match=at(tmp_path / "data" / "train") + ": a symbolic link to "
                       + re.escape(f"{tmp_path / 'elsewhere'}; DVC does not version")):
        build(p)


# --- bad files: each is an error naming it, or with on_bad_image: skip a warning and a count ---

def at(path: Path) -> str:
    """Regex: a message that starts with this path."""
    return "^" + re.escape(str(path))


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_is_found_by_the_full_decode(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    array = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(array).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with Image.open(path) as lazy:
        assert lazy.size == (64, 64)  # the header alone opens fine: only decoding finds the cut
    with pytest.raises(DataError, match=at(path) + ": cannot read image: .*truncated"):
        load_image(path, 64, 1)


def test_corrupt_file_and_image_suffix_on_a_non_image(tmp_path):
    save(tmp_path / "corrupt.png", np.random.default_rng(0).integers(0, 256, (32, 32), np.uint8))
    data = bytearray((tmp_path / "corrupt.png").read_bytes())
    data[60:80] = bytes(20)  # zero a stretch of the compressed pixel data (IDAT starts at 41)
    (tmp_path / "corrupt.png").write_bytes(bytes(data))
    (tmp_path / "text.png").write_text("not a png")
    with pytest.raises(DataError, match=at(tmp_path / "corrupt.png") + ": cannot read image: "):
        load_image(tmp_path / "corrupt.png", 8, 1)
    text = at(tmp_path / "text.png") + ": cannot read image: cannot identify image file"
    with pytest.raises(DataError, match=text):
        load_image(tmp_path / "text.png", 8, 1)


def test_non_image_in_class_folder_is_bad_but_dotfiles_and_top_level_files_are_not(tmp_path):
    # The MNIST mirror's layout: README.md and train.csv next to the split folders.
    folder(tmp_path / "train", {"0": 2, "1": 1})
    folder(tmp_path / "test", {"0": 1})
    for name in ("README.md", "train.csv", "LICENSE", "train/notes.md", "train/0/.DS_Store"):
        (tmp_path / name).write_text("x")
    p = PreprocessParams(data_dir=str(tmp_path), image_size=6)
    assert len(build(p)[0]) == 3  # files next to class folders, and dotfiles, are fine
    (tmp_path / "train" / "1" / "labels.txt").write_text("1")
    labels = at(tmp_path / "train" / "1" / "labels.txt")
    with pytest.raises(DataError, match=labels + r": not an image file \(expected one of .*\.png"):
        build(p)


def test_linked_class_folder_is_refused_or_skipped_but_a_linked_file_is_read(tmp_path, capsys):
    # `dvc add` skips a link to a folder (its images would be trained on but not pinned by
    # data.dvc), while it hashes what a linked file holds and pins that.
    elsewhere = folder(tmp_path / "elsewhere", {"1": 2})
    data = folder(tmp_path / "data", {"0": 1})
    (data / "1").symlink_to(elsewhere / "1", target_is_directory=True)
    (data / "0" / "linked.png").symlink_to(elsewhere / "1" / "0.png")
    problem = (f"{data / '1'}: a symbolic link to {elsewhere / '1'}; DVC does not version what a "
               "linked folder holds (`dvc add` skips it), so data.dvc would not pin these images")
    fix = f"replace the link with a copy: rm {data / '1'} && cp -r {elsewhere / '1'} {data / '1'}"
    with pytest.raises(DataError) as err:
        load_folder(data, 6, 1)
    assert str(err.value) == (f"{problem}; {fix} (or set preprocess.on_bad_image: skip to leave "
                              "it out)")
    images = load_folder(data, 6, 1, bad=BadImages("skip"))
    assert images.classes == ("0",) and len(images) == 2  # 0.png and the linked file
    assert capsys.readouterr().err == f"warning: {problem}; not used as a class ({fix})\n"


def test_images_next_to_class_folders_are_reported_as_left_out(tmp_path, capsys):
    data = folder(tmp_path / "train", {"0": 4})
    for i in range(40):
        save(data / f"loose{i:02d}.jpg", np.zeros((6, 6), np.uint8))
    (data / "notes.md").write_text("not an image: not reported")
    files, _ = find_images(data, BadImages())
    assert len(files) == 4
    assert capsys.readouterr().err == (
        f"warning: {data}: left out 40 image files beside the class folders (loose00.jpg ... "
        "loose39.jpg); only <class>/<image> is read, so files next to class folders are not "
        "data: move them into a class folder\n")
    find_images(folder(tmp_path / "one", {"0": 1}), BadImages())  # no loose files: no warning
    save(tmp_path / "one" / "x.png", np.zeros((6, 6), np.uint8))
    find_images(tmp_path / "one", BadImages())
    assert capsys.readouterr().err == (
        f"warning: {tmp_path / 'one'}: left out 1 image file beside the class folders (x.png); "
        "only <class>/<image> is read, so files next to class folders are not data: move them "
        "into a class folder\n")


def test_folder_inside_a_class_folder_is_named_as_a_folder(tmp_path):
    data = folder(tmp_path / "train", {"0": 1})
    save(data / "0" / "more" / "1.png", np.zeros((6, 6), np.uint8))
    with pytest.raises(DataError) as err:
        load_folder(data, 6, 1)
    assert str(err.value) == (
        f"{data / '0' / 'more'}: a folder inside the class folder {data / '0'}; only "
        "<class>/<image> is read, nothing nested deeper: move its images up into the class "
        "folder, or make it a class folder of its own")


def test_skip_mode_warns_per_file_counts_and_keeps_the_good_images(tmp_path, capsys):
    folder(tmp_path / "train", {"0": 2, "1": 1})
    folder(tmp_path / "test", {"0": 1})
    bad = [tmp_path / "train" / "1" / "zz.txt", tmp_path / "test" / "0" / "zz.png"]
    for path in bad:
        path.write_text("garbage")
    p = PreprocessParams(data_dir=str(tmp_path), image_size=6, on_bad_image="skip")
    train, reference, skipped = build(p)
    assert skipped == bad
    assert train.labels.tolist() == [0, 0, 1] and len(reference) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"warning: skipped {bad[0]}: not an image file (expected one of")
    assert lines[1] == (f"warning: skipped {bad[1]}: cannot read image: cannot identify image "
                        f"file '{bad[1]}'")


def test_skip_mode_names_the_first_files_then_only_counts(tmp_path, capsys):
    folder(tmp_path / "c", {"0": 1})
    for i in range(MAX_LISTED + 5):
        (tmp_path / "c" / "0" / f"bad{i:02d}.txt").write_text("x")
    bad = BadImages("skip")
    images = load_folder(tmp_path / "c", 6, 1, bad=bad)
    assert len(images) == 1 and len(bad.skipped) == MAX_LISTED + 5
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == MAX_LISTED + 1
    assert f"bad{MAX_LISTED - 1:02d}.txt" in lines[MAX_LISTED - 1]
    assert lines[-1] == (f"warning: more than {MAX_LISTED} bad files; the rest are skipped "
                         "without a line each")


def test_empty_class_folder_is_an_error_or_skipped_as_a_class(tmp_path, capsys):
    folder(tmp_path / "d", {"0": 1, "2": 1})
    (tmp_path / "d" / "1").mkdir()
    (tmp_path / "d" / "3").mkdir()
    (tmp_path / "d" / "3" / "broken.png").write_text("x")
    with pytest.raises(DataError, match=at(tmp_path / "d" / "1") + ": empty class folder"):
        load_folder(tmp_path / "d", 6, 1)
    bad = BadImages("skip")
    images = load_folder(tmp_path / "d", 6, 1, bad=bad)
    assert images.classes == ("0", "2") and images.labels.tolist() == [0, 1]
    assert bad.skipped == [tmp_path / "d" / "3" / "broken.png"]
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'd' / '1'}: empty class folder; not used as a class" in err
    assert f"warning: {tmp_path / 'd' / '3'}: every file was skipped; not used as a class" in err


def test_data_set_with_every_file_skipped_is_an_error(tmp_path):
    for name in ("a/x.png", "b/y.txt"):
        (tmp_path / "e" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "e" / name).write_text("x")
    with pytest.raises(DataError, match=at(tmp_path / "e") + ": no usable images; all 2 files"):
        load_folder(tmp_path / "e", 6, 1, bad=BadImages("skip"))


def test_image_smaller_than_image_size_is_bad_unless_upscaling_is_allowed(tmp_path):
    save(tmp_path / "small.png", np.full((10, 12), 77, np.uint8))
    small = at(tmp_path / "small.png") + ": 12x10 px is smaller than preprocess.image_size = 16 "
    with pytest.raises(DataError, match=small + ".*allow_upscale: true"):
        load_image(tmp_path / "small.png", 16, 1)
    out = load_image(tmp_path / "small.png", 16, 1, allow_upscale=True)
    assert out.shape == (1, 16, 16) and (out == 77).all()  # a flat image stays flat
    assert load_image(tmp_path / "small.png", 10, 1).shape == (1, 10, 10)  # equal is not smaller


# --- image modes: every one becomes 8-bit grey or RGB with the values the math gives ---

def test_one_bit_image_is_0_or_255(tmp_path):
    Image.fromarray(np.array([[True, False], [False, True]])).save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    assert load_image(tmp_path / "bits.png", 2, 1)[0].tolist() == [[255, 0], [0, 255]]


def test_palette_with_and_without_transparency(tmp_path):
    image = Image.new("P", (3, 3))
    image.putpalette([200, 100, 50, 0, 0, 255, 9, 9, 9])
    image.putdata([0, 1, 2] * 3)  # every row: palette entries 0, 1, 2
    image.save(tmp_path / "plain.png")
    image.save(tmp_path / "clear.png", transparency=2)  # entry 2 (hidden colour 9, 9, 9) is clear
    assert load_image(tmp_path / "plain.png", 3, 3)[:, 0].tolist() == [[200, 0, 9], [100, 0, 9],
                                                                     [50, 255, 9]]
    assert load_image(tmp_path / "clear.png", 3, 3)[:, 0].tolist() == [[200, 0, 0], [100, 0, 0],
                                                                     [50, 255, 0]]


def test_alpha_is_composited_onto_black_whatever_the_hidden_colour(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)  # opaque: unchanged
    rgba[0, 1] = (200, 100, 50, 128)  # half: round(c * 128 / 255)
    rgba[1, 0] = (255, 255, 255, 0)  # clear, hiding white: black
    rgba[1, 1] = (17, 230, 99, 0)  # clear, hiding another colour: black too
    save(tmp_path / "rgba.png", rgba)
    out = load_image(tmp_path / "rgba.png", 2, 3)
    assert out[:, 0, 0].tolist() == [200, 100, 50]
    assert out[:, 0, 1].tolist() == [round(200 * 128 / 255), round(100 * 128 / 255),
                                     round(50 * 128 / 255)]  # 100, 50, 25
    assert (out[:, 1] == 0).all()
    la = np.array([[[240, 255], [240, 64]], [[255, 0], [3, 0]]], np.uint8)  # (grey, alpha)
    save(tmp_path / "la.png", la)
    assert Image.open(tmp_path / "la.png").mode == "LA"
    assert load_image(tmp_path / "la.png", 2, 1)[0].tolist() == [[240, round(240 * 64 / 255)],
                                                                 [0, 0]]


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128, 129, 257], [32768, 65279, 65534, 65535]], np.uint16)
    expected = np.round(values / 65535 * 255).astype(int).tolist()  # [[0, 0, 1, 1], [128, ...]]
    save(tmp_path / "grey16.png", values)
    Image.frombytes("I;16B", (4, 2), values.astype(">u2").tobytes()).save(tmp_path / "big.tif")
    save(tmp_path / "int32.tif", values.astype(np.int32))
    for name, mode in (("grey16.png", "I;16"), ("big.tif", "I;16B"), ("int32.tif", "I")):
        assert Image.open(tmp_path / name).mode == mode
        out = load_image(tmp_path / name, 2, 1)  # 4x2 at size 2: no resize, the middle columns
        assert out[0].tolist() == [row[1:3] for row in expected], mode
    assert load_image(tmp_path / "grey16.png", 2, 3)[:, 1, 1].tolist() == [255] * 3


def test_modes_without_an_8_bit_meaning_are_bad_images(tmp_path):
    save(tmp_path / "neg.tif", np.array([[-1, 70000]], np.int32))
    negative = at(tmp_path / "neg.tif") + r": cannot read image: mode I pixel values -1\.\.70000 "
    with pytest.raises(DataError, match=negative + "lie outside the 16-bit range"):
        load_image(tmp_path / "neg.tif", 1, 1)
    save(tmp_path / "float.tif", np.array([[0.5]], np.float32))
    with pytest.raises(DataError, match=at(tmp_path / "float.tif") + ": .*mode F is not supported"):
        load_image(tmp_path / "float.tif", 1, 1)


def test_cmyk_converts_to_rgb(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0]], [[0, 255, 255, 0], [0, 0, 0, 255]]], np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "cmyk.tif")
    out = load_image(tmp_path / "cmyk.tif", 2, 3)
    # R = (255 - K) * (1 - C / 255), and so on: white, cyan, red, black
    assert out.transpose(1, 2, 0).tolist() == [[[255, 255, 255], [0, 255, 255]],
                                               [[255, 0, 0], [0, 0, 0]]]


# --- the preprocess stage as a user runs it: one line on error, the count when skipping ---

def run_preprocess(tmp_path: Path, on_bad_image: str, counts: dict[str, int] | None = None,
                   broken: bool = True) -> subprocess.CompletedProcess:
    folder(tmp_path / "data" / "train", counts or {"0": 2, "1": 2}, size=8)
    if broken:
        (tmp_path / "data" / "train" / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "params.yaml").write_text(
        f"preprocess:\n  data_dir: data\n  test_split: ''\n  image_size: 8\n"
        f"  on_bad_image: {on_bad_image}\n"
        "model:\n  channel_mult: [1, 2]\n  attention_resolutions: [4]\n")  # fits 8 px
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "stages.preprocess"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_preprocess_stage_reports_a_broken_image_in_one_line(tmp_path):
    result = run_preprocess(tmp_path, "error")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("preprocess: error: data/train/1/broken.png: cannot read "
                                     "image: cannot identify image file "
                                     "'data/train/1/broken.png'")
    assert not list((tmp_path / "outputs").rglob("*.npy"))  # nothing written, not even in part


def test_preprocess_stage_skips_and_counts_a_broken_image(tmp_path):
    result = run_preprocess(tmp_path, "skip")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("warning: skipped data/train/1/broken.png: cannot read image")
    assert result.stdout.splitlines() == [
        "preprocess: 3 training images and 1 reference image, 1x8x8, 2 classes",
        "preprocess: skipped 1 bad file (preprocess.on_bad_image: skip)"]
    assert len(ImageSet.load(tmp_path / "outputs" / "preprocess" / "train")) == 3  # 4 - 1 held


def test_preprocess_stage_counts_read_right_for_one_and_zero(tmp_path):
    result = run_preprocess(tmp_path, "skip", {"0": 11}, broken=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [  # no line for 0 skipped files
        "preprocess: 10 training images and 1 reference image, 1x8x8, 1 class"]


def test_image_set_save_load_roundtrip(tmp_path):
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    original = ImageSet(images, torch.tensor([0, 1, 1, 0]), ("x", "y"))
    original.save(tmp_path / "set")
    loaded = ImageSet.load(tmp_path / "set")
    assert torch.equal(loaded.images, images) and loaded.labels.tolist() == [0, 1, 1, 0]
    assert loaded.classes == ("x", "y")


def test_pixel_conversions_roundtrip_every_value():
    pixels = torch.arange(256, dtype=torch.uint8)
    x = to_model_range(pixels)
    assert x[0] == -1 and x[-1] == 1
    assert torch.equal(to_uint8(x), pixels)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_image_matches_torchvision_make_grid(channels):
    import torchvision.utils  # the reference implementation; slow to import, so only here

    images = torch.randint(0, 256, (10, channels, 5, 7), dtype=torch.uint8)
    ours = np.asarray(grid_image(images, columns=4))
    reference = torchvision.utils.make_grid(images, nrow=4, padding=2).permute(1, 2, 0).numpy()
    assert np.array_equal(ours, reference[..., 0] if channels == 1 else reference)


# --- preprocessing in parallel, from folders and archives, into memory-mapped sets ---

def mixed_folder(root: Path) -> Path:
    """train/ and test/ of small RGB images of different sizes, varied pixels."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", {"0": 70, "1": 60}), ("test", {"0": 5, "1": 4})):
        for name, n in counts.items():
            for i in range(n):
                shape = (9 + i % 4, 8 + i % 3, 3)
                save(root / split / name / f"{i:03d}.png", rng.integers(0, 256, shape, np.uint8))
    return root


def set_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("test_split", ["test", ""])
def test_outputs_are_the_same_bytes_for_any_worker_count(tmp_path, test_split):
    data = mixed_folder(tmp_path / "data")
    outputs = []
    for workers in (1, 2, 3):
        p = PreprocessParams(data_dir=str(data), image_size=8, channels=3, workers=workers,
                             test_split=test_split, max_train_images=100)
        out = tmp_path / f"out{workers}"
        build_datasets(p, out / "train", out / "reference")
        outputs.append((set_bytes(out / "train"), set_bytes(out / "reference")))
    assert outputs[0] == outputs[1] == outputs[2]
    train = ImageSet.load(tmp_path / "out1" / "train")
    assert train.images.shape == (100, 3, 8, 8) and train.classes == ("0", "1")
    # Row by row the images are those of the files the labels name, decoded one at a time.
    files, _ = find_images(data / "train", BadImages())
    decoded = {load_image(f, 8, 3).tobytes(): f.parent.name for f in files}
    assert [decoded[row.numpy().tobytes()] for row in train.images] == [
        train.classes[i] for i in train.labels]


def archive(data: Path, path: Path) -> Path:
    """`data`'s files as a zip or a tar(.gz), `train/0/000.png` members, in a shuffled order."""
    files = sorted(f for f in data.rglob("*") if f.is_file())
    files = [files[i] for i in np.random.default_rng(1).permutation(len(files))]
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as z:
            for f in files:
                z.write(f, f.relative_to(data).as_posix())
    else:
        with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
            for f in files:
                tar.add(f, f"./{f.relative_to(data).as_posix()}")
    return path


@pytest.mark.parametrize("name", ["images.zip", "images.tar.gz", "images.tar"])
def test_an_archive_gives_the_same_sets_as_its_folder(tmp_path, name):
    data = mixed_folder(tmp_path / "data")
    results = []
    for source in (data, archive(data, tmp_path / name)):
        p = PreprocessParams(data_dir=str(source), image_size=8, channels=3, test_split="",
                             workers=2)
        out = tmp_path / f"out-{source.name}"
        build_datasets(p, out / "train", out / "reference")
        results.append((set_bytes(out / "train"), set_bytes(out / "reference")))
    assert results[0] == results[1]


def test_a_corrupt_archive_member_is_named_like_a_file(tmp_path, capsys):
    data = folder(tmp_path / "data" / "train", {"0": 3, "1": 2}).parent
    folder(data / "test", {"1": 1})
    (data / "train" / "1" / "broken.png").write_bytes(b"not a png")
    zipped = archive(data, tmp_path / "images.zip")
    with pytest.raises(DataError) as err:
        build(PreprocessParams(data_dir=str(zipped), image_size=6))
    member = zipped / "train" / "1" / "broken.png"
    assert str(err.value) == (f"{member}: cannot read image: cannot identify image file "
                              f"'{member}'")
    train, reference, skipped = build(PreprocessParams(data_dir=str(zipped), image_size=6,
                                                       on_bad_image="skip"))
    assert skipped == [member] and len(train) == 5 and len(reference) == 1
    assert capsys.readouterr().err.startswith(f"warning: skipped {member}: cannot read image")


def test_a_skipped_image_leaves_no_gap_in_the_held_out_split(tmp_path):
    # 10 good images and a broken one: the sets are drawn as if the broken file were not there.
    data = folder(tmp_path / "data", {"0": 10})
    p = PreprocessParams(data_dir=str(data), train_split="", test_split="", image_size=6,
                         holdout_fraction=0.2, on_bad_image="skip")
    clean = build(p)
    (data / "0" / "5b.png").write_bytes(b"broken")
    train, reference, skipped = build(p)
    assert skipped == [data / "0" / "5b.png"]
    assert torch.equal(train.images, clean[0].images)
    assert torch.equal(reference.images, clean[1].images) and len(reference) == 2


def test_a_loaded_set_is_memory_mapped_and_writable_without_touching_its_file(tmp_path):
    ImageSet(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 0]),
             ("a", "b")).save(tmp_path / "set")
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [
        "classes.json", "images.npy", "labels.npy"]
    loaded = ImageSet.load(tmp_path / "set")
    loaded.images[0] = 255  # copy-on-write: the process's pages change, the file does not
    assert ImageSet.load(tmp_path / "set").images.sum() == 0
    assert loaded.labels.dtype == torch.int64 and loaded.images.is_contiguous()
    with pytest.raises(DataError, match="not found; run the preprocess stage"):
        ImageSet.load(tmp_path / "missing")
    with pytest.raises(DataError, match="not found; run the train_autoencoder stage"):
        ImageSet.load(tmp_path / "missing", written_by="train_autoencoder")
