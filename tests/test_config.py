"""params.yaml loading: defaults, typos, types and ranges; the dotted keys of `dvc exp run -S`."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import Params, ParamsError, flatten, from_dict, load_params, to_dict

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_empty_and_partial_files_take_defaults(tmp_path):
    assert load_params(write(tmp_path, "")) == Params()
    params = load_params(write(tmp_path, "train:\n  lr: 0.0003\n"))
    assert params.train.lr == 0.0003
    assert params.train.steps == Params().train.steps
    assert params.model == Params().model


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 3e-4 as a string; `dvc exp run -S train.lr=3e-4` writes exactly that.
    assert load_params(write(tmp_path, "train:\n  lr: 3e-4\n")).train.lr == pytest.approx(3e-4)


def test_unknown_key_names_key_section_and_valid_names(tmp_path):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, "train:\n  lerning_rate: 0.1\n"))
    message = str(err.value)
    assert "train.lerning_rate" in message and "section 'train'" in message
    assert "train.lr" in message and str(tmp_path / "params.yaml") in message


def test_unknown_key_suggests_the_close_name():
    with pytest.raises(ParamsError, match=r"'model\.base_chanels'.*did you mean model\.base_channels"):
        from_dict({"model": {"base_chanels": 64}})


def test_unknown_section_is_named():
    with pytest.raises(ParamsError, match=r"'trian'.*did you mean train"):
        from_dict({"trian": {"lr": 0.1}})


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "steps", "many", "must be an integer"),
    ("train", "steps", 2.5, "must be an integer"),
    ("train", "steps", True, "must be an integer"),
    ("train", "lr", "fast", "must be a number"),
    ("sample", "clip_sample", "yes", "must be true or false"),
    ("model", "channel_mult", 2, "must be a list of integers"),
    ("sample", "method", "ddrm", "choose one of 'ddpm', 'ddim'"),
    ("preprocess", "channels", 2, "choose one of 1, 3"),
])
def test_wrong_type_names_key_value_and_type(section, key, value, expected):
    with pytest.raises(ParamsError) as err:
        from_dict({section: {key: value}})
    assert f"{section}.{key} = {value!r}" in str(err.value)
    assert expected in str(err.value)


@pytest.mark.parametrize("section, key, value, allowed", [
    ("train", "lr", -1.0, "> 0"),
    ("train", "steps", 0, ">= 1"),
    ("model", "dropout", 1.0, "< 1"),
    ("sample", "eta", 1.5, "<= 1"),
    ("model", "channel_mult", [1, 0], ">= 1"),
    ("preprocess", "holdout_fraction", 0.0, "> 0"),
])
def test_out_of_range_names_key_value_and_range(section, key, value, allowed):
    with pytest.raises(ParamsError) as err:
        from_dict({section: {key: value}})
    assert f"{section}.{key} = " in str(err.value) and "out of range" in str(err.value)
    assert allowed in str(err.value)


def test_params_are_frozen():
    params = Params()
    with pytest.raises(AttributeError):
        params.train.lr = 1.0  # type: ignore[misc]


def test_flatten_gives_the_dotted_keys_of_dvc_exp_run():
    flat = flatten(from_dict({"train": {"lr": 0.005}, "model": {"channel_mult": [1, 2]}}))
    assert flat["train.lr"] == 0.005
    assert flat["model.channel_mult"] == (1, 2)
    assert len(flat) == sum(len(section) for section in to_dict(Params()).values())


def test_repository_params_yaml_sets_every_key():
    """params.yaml is the single source: it spells out every field, so nothing hides in code."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert {s: set(v) for s, v in raw.items()} == {s: set(v) for s, v in to_dict(Params()).items()}
    assert to_dict(load_params(ROOT / "params.yaml")) == raw


def test_dvc_yaml_params_exist():
    """Every params entry of every stage in dvc.yaml names a real section or dotted key."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    flat = flatten(Params())
    sections = set(to_dict(Params()))
    for stage in stages.values():
        for name in stage.get("params", []):
            assert name in sections or name in flat, name
