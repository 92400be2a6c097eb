"""Image folders -> uint8 tensors: layout rules, resize/crop, splits, and pixel conversions."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import PreprocessParams
from pipeline.data import (DataError, ImageSet, build_datasets, find_images, grid_image,
                           load_image, to_model_range, to_uint8)


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


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
    files, names, classes = find_images(folder(tmp_path / "a", {"7": 2, "3": 3}))
    assert classes == ["3", "7"] and names.count("3") == 3 and len(files) == 5
    save(tmp_path / "flat" / "x.png", np.zeros((3, 3), np.uint8))
    assert find_images(tmp_path / "flat")[2] == ["flat"]


def test_missing_folder_and_bad_image_name_the_path(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        find_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        find_images(tmp_path / "empty")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_image(tmp_path / "broken.png", 4, 1)


def test_build_datasets_with_test_split(tmp_path):
    folder(tmp_path / "train", {"0": 3, "1": 2})
    folder(tmp_path / "test", {"1": 1})
    p = PreprocessParams(data_dir=str(tmp_path), image_size=6, channels=1)
    train, reference = build_datasets(p)
    assert train.images.shape == (5, 1, 6, 6) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 0, 0, 1, 1]
    assert reference.classes == ("0", "1") and reference.labels.tolist() == [1]
    assert reference.images[0].unique().tolist() == [10]  # class index 1, image 0


def test_test_split_with_an_unknown_class_is_refused(tmp_path):
    folder(tmp_path / "train", {"0": 1})
    folder(tmp_path / "test", {"9": 1})
    with pytest.raises(DataError, match=r"\['9'\]"):
        build_datasets(PreprocessParams(data_dir=str(tmp_path), image_size=6))


def test_holdout_split_is_disjoint_seeded_and_capped(tmp_path):
    folder(tmp_path / "all", {"0": 10, "1": 10})
    p = PreprocessParams(data_dir=str(tmp_path / "all"), train_split="", test_split="",
                         holdout_fraction=0.25, image_size=6, max_train_images=12)
    train, reference = build_datasets(p)
    assert len(reference) == 5 and len(train) == 12
    pixel_values = lambda s: {int(v) for v in s.images[:, 0, 0, 0]}  # noqa: E731
    assert not pixel_values(train) & pixel_values(reference)  # every image is unique
    again_train, again_reference = build_datasets(p)
    assert torch.equal(train.images, again_train.images)
    assert torch.equal(reference.images, again_reference.images)


def test_missing_data_dir_says_how_to_get_data(tmp_path):
    with pytest.raises(DataError, match=r"preprocess.data_dir.*stages.get_data"):
        build_datasets(PreprocessParams(data_dir=str(tmp_path / "none")))


def test_image_set_save_load_roundtrip(tmp_path):
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    original = ImageSet(images, torch.tensor([0, 1, 1, 0]), ("x", "y"))
    original.save(tmp_path / "set.pt")
    loaded = ImageSet.load(tmp_path / "set.pt")
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
