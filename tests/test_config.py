"""params.yaml loading: defaults, typos, types, ranges and impossible combinations of keys; the
dotted keys of `dvc exp run -S`."""

import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.config import (Params, ParamsError, SampleParams, beta_problem, check_classes,
                             check_data_size, flatten, from_dict, load_params, to_dict, unet_problem,
                             zero_terminal_snr_problem)

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
    ("train", "micro_batch_size", -1, ">= 0"),
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
    flat = flatten(from_dict({"train": {"lr": 0.005},
                              "model": {"channel_mult": [1, 2], "attention_resolutions": [14]}}))
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


# Each case: params that every key allows alone, and what the message must name (keys, values,
# the fix). Defaults: 28 px, channel_mult [1, 2, 4] (28, 14, 7 px; 16, 32, 64 channels), T = 1000.
@pytest.mark.parametrize("raw, expected", [
    ({"preprocess": {"image_size": 30}},
     ["preprocess.image_size=30", "2**(levels-1)=4", "model.channel_mult=[1, 2, 4] (3 levels)",
      "at most 2 levels for 30 px", "multiple of 4"]),
    ({"preprocess": {"image_size": 64}, "model": {"channel_mult": [1, 1, 2, 2, 2, 2, 2, 2]}},
     ["preprocess.image_size=64", "2**(levels-1)=128", "(8 levels)", "at most 7 levels"]),
    ({"model": {"attention_resolutions": [7, 8]}},
     ["model.attention_resolutions=[7, 8]: [8] never occur", "preprocess.image_size=28",
      "model.channel_mult=[1, 2, 4] are [28, 14, 7]"]),
    ({"preprocess": {"image_size": 32}},  # the default attention at 7 px is not a 32 px size
     ["model.attention_resolutions=[7]: [7] never occur", "are [32, 16, 8]"]),
    ({"model": {"norm_groups": 6}},
     ["model.norm_groups=6 must divide model.base_channels=16", "[16, 32, 64]",
      "use one of 1, 2, 4, 8, 16"]),
    ({"model": {"base_channels": 24, "channel_mult": [1, 3, 4], "norm_groups": 16}},
     ["model.norm_groups=16", "model.base_channels=24", "[24, 72, 96]",
      "use one of 1, 2, 3, 4, 6, 8, 12, 24"]),
    ({"model": {"num_heads": 5}},
     ["model.num_heads=5 must divide the 64 channels of the 7 px attention level",
      "use one of 1, 2, 4, 8, 16, 32, 64"]),
    ({"model": {"num_heads": 5, "attention_resolutions": [28, 7], "base_channels": 24}},
     ["model.num_heads=5 must divide the 24 channels of the 28 px",
      "use one of 1, 2, 3, 4, 6, 8, 12, 24"]),
    ({"model": {"base_channels": 15, "norm_groups": 1}},
     ["model.base_channels=15 must be even", "sines", "16"]),
    ({"model": {"channel_mult": []}}, ["model.channel_mult=[] must have one entry per level"]),
    ({"sample": {"num_steps": 1001}},
     ["sample.num_steps = 1001 is more than diffusion.num_timesteps = 1000", "at most 1000"]),
    ({"diffusion": {"num_timesteps": 20}, "sample": {"num_steps": 20}},
     ["train.grid_sampling_steps = 25 is more than diffusion.num_timesteps = 20", "at most 20"]),
    ({"diffusion": {"beta_start": 0.03}},
     ["diffusion.beta_start=0.03 and diffusion.beta_end=0.02", "0 < diffusion.beta_start <= "
      "diffusion.beta_end < 1", "diffusion.schedule='linear'", "only 'cosine' ignores them"]),
    ({"diffusion": {"schedule": "exponential", "beta_start": 0.5, "beta_end": 0.1}},
     ["diffusion.beta_start=0.5 and diffusion.beta_end=0.1", "diffusion.schedule='exponential'"]),
    ({"diffusion": {"rescale_zero_terminal_snr": True}},
     ["diffusion.rescale_zero_terminal_snr=True needs diffusion.prediction_type 'v_prediction' or "
      "'sample'", "diffusion.prediction_type='epsilon'", "change one of the two"]),
    ({"diffusion": {"rescale_zero_terminal_snr": True, "prediction_type": "v_prediction",
                    "num_timesteps": 1}, "sample": {"num_steps": 1},
      "train": {"grid_sampling_steps": 1}},
     ["diffusion.rescale_zero_terminal_snr=True needs diffusion.num_timesteps >= 2; got 1"]),
    ({"train": {"micro_batch_size": 24}},
     ["train.micro_batch_size = 24 must divide each process's batch, train.batch_size = 64",
      "use one of 1, 2, 4, 8, 16, 32, 64, or 0 for the whole batch"]),
    ({"train": {"micro_batch_size": 64, "num_processes": 2}},
     ["train.micro_batch_size = 64 must divide each process's batch, train.batch_size / "
      "train.num_processes = 64 / 2 = 32", "use one of 1, 2, 4, 8, 16, 32,"]),
    # Latent space: the UNet is built for the 28 / 4 = 7 px latents of the default autoencoder.
    ({"model": {"space": "latent"}},
     ["the latent side (preprocess.image_size / autoencoder.factor)=7 is not divisible by "
      "2**(levels-1)=4", "model.channel_mult=[1, 2, 4]"]),
    ({"model": {"space": "latent"}, "autoencoder": {"factor": 8}},
     ["autoencoder.channel_mult=[1, 2, 2] must have log2(autoencoder.factor) + 1 = 4 entries"]),
    ({"model": {"space": "latent"}, "autoencoder": {"factor": 8, "channel_mult": [1, 2, 2, 2]}},
     ["preprocess.image_size=28 is not divisible by autoencoder.factor=8"]),
    ({"model": {"space": "latent", "channel_mult": [1], "attention_resolutions": [7]},
      "autoencoder": {"norm_groups": 12}},
     ["autoencoder.norm_groups=12 must divide autoencoder.base_channels=32"]),
])
def test_impossible_combination_names_keys_values_and_fix(raw, expected):
    with pytest.raises(ParamsError) as err:
        from_dict(raw)
    message = str(err.value)
    for part in expected:
        assert part in message, (part, message)
    assert "\n" not in message


@pytest.mark.parametrize("raw", [
    {"preprocess": {"image_size": 32}, "model": {"attention_resolutions": [8, 16]}},
    {"preprocess": {"image_size": 30}, "model": {"channel_mult": [1, 2],
                                                 "attention_resolutions": [15]}},
    {"model": {"channel_mult": [1], "attention_resolutions": []}},
    {"model": {"num_heads": 3, "attention_resolutions": []}},  # heads matter only for attention
    {"model": {"num_heads": 64, "norm_groups": 16}},
    {"sample": {"num_steps": 1000}, "train": {"grid_sampling_steps": 1000}},
    {"diffusion": {"beta_start": 0.02}},  # equal: a constant schedule
    {"diffusion": {"schedule": "cosine", "beta_start": 0.5, "beta_end": 0.1}},  # unused by cosine
    {"diffusion": {"rescale_zero_terminal_snr": True, "prediction_type": "sample"}},
    {"sample": {"num_images": 20}, "evaluate": {"kid_subset_size": 20}},
    {"train": {"micro_batch_size": 64}},  # the whole batch in one pass, as 0
    {"train": {"micro_batch_size": 1, "batch_size": 6, "num_processes": 3}},
    {"model": {"space": "latent", "channel_mult": [1, 2], "attention_resolutions": []},
     "autoencoder": {"factor": 2, "channel_mult": [1, 2]}},  # a UNet of 14 and 7 px latents
    {"autoencoder": {"factor": 8}},  # ignored in pixel space: not checked there
])
def test_possible_combinations_at_the_limits_load(raw):
    flat = flatten(from_dict(raw))
    for section, values in raw.items():
        for key, value in values.items():
            assert flat[f"{section}.{key}"] == (tuple(value) if isinstance(value, list) else value)


def test_every_impossible_combination_is_in_one_message(tmp_path):
    path = write(tmp_path, "preprocess:\n  image_size: 30\nsample:\n  num_steps: 5000\n"
                           "train:\n  grid_sampling_steps: 2000\n")
    with pytest.raises(ParamsError) as err:
        load_params(path)
    message = str(err.value)
    assert message.startswith(f"{path}: 3 impossible combinations: (1) preprocess.image_size=30")
    assert "(2) sample.num_steps = 5000" in message
    assert "(3) train.grid_sampling_steps = 2000" in message


def test_checkpoint_sections_load_without_the_defaults_of_the_rest():
    """A checkpoint saves model and diffusion only; the other sections' defaults were never chosen,
    and a sample.num_steps of 50 is no reason to refuse a model trained with 40 timesteps."""
    saved = {"diffusion": {"num_timesteps": 40}}
    with pytest.raises(ParamsError, match="sample.num_steps = 50"):
        from_dict(saved)
    assert from_dict(saved, check_combinations=False).diffusion.num_timesteps == 40


def test_unknown_sampler_names_the_key_and_every_valid_name(tmp_path):
    valid = typing.get_args(typing.get_type_hints(SampleParams)["method"])
    assert "ddpm" in valid and "ddim" in valid
    path = write(tmp_path, "sample:\n  method: ddmp\n")
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert str(err.value) == (f"{path}: sample.method = 'ddmp' is not allowed; choose one of "
                              + ", ".join(repr(name) for name in valid))


@pytest.mark.parametrize("images, cap, expected", [
    (50, 50, "train.batch_size = 64 is larger than the training set, 50 images "
             "(preprocess.max_train_images = 50); use a train.batch_size of at most 50"),
    (63, 0, "train.batch_size = 64 is larger than the training set, 63 images; use a "
            "train.batch_size of at most 63"),
])
def test_batch_larger_than_the_training_set(images, cap, expected):
    with pytest.raises(ParamsError) as err:
        check_data_size(from_dict({"preprocess": {"max_train_images": cap}}), images)
    assert str(err.value).startswith(expected)


def test_batch_as_large_as_the_training_set_is_fine():
    assert check_data_size(Params(), 64) is None


def test_the_autoencoders_batch_is_checked_in_its_own_name():
    params = from_dict({"autoencoder": {"batch_size": 32}})
    assert check_data_size(params, 32, "autoencoder") is None
    with pytest.raises(ParamsError, match=r"^autoencoder.batch_size = 32 is larger than the "
                                          r"training set, 31 images; use a autoencoder.batch_size"):
        check_data_size(params, 31, "autoencoder")


@pytest.mark.parametrize("num_classes", [1, 3])
def test_num_classes_other_than_the_data_class_count_is_refused(num_classes):
    # With 1 on two classes, label 1 would be the UNet's null label (index num_classes).
    with pytest.raises(ParamsError) as err:
        check_classes(from_dict({"model": {"num_classes": num_classes}}), ("cat", "dog"))
    assert str(err.value) == (
        f"model.num_classes = {num_classes} does not match the training images, which have 2 "
        "classes (class folders); set model.num_classes to 2 for a class-conditional model, or "
        "to 0 for an unconditional one")


def test_train_stage_refuses_a_wrong_num_classes_before_training(tmp_path):
    from stage_project import make_project, start  # imports MLflow: only for this test
    project = make_project(tmp_path / "p", model={"num_classes": 1})  # its data has classes a, b
    assert start(project).wait(timeout=120) != 0
    log = (project / "log.txt").read_text()
    assert "model.num_classes = 1 does not match the training images, which have 2 classes" in log
    assert "Traceback" not in log and "MLflow run" not in log  # stopped before tracking started


def test_num_classes_zero_or_the_class_count_is_fine():
    assert check_classes(from_dict({"model": {"num_classes": 0}}), ("a", "b")) is None  # unconditional
    assert check_classes(Params(), tuple("0123456789")) is None  # the default: MNIST's 10 digits
    assert check_classes(from_dict({"model": {"num_classes": 1}}), ("all",)) is None
    assert check_classes(from_dict({"model": {"num_classes": 2}}), ("a", "b")) is None


def test_unet_and_scheduler_raise_the_config_rules_in_their_own_names():
    """One source for each rule: the library classes report the config's check, with their own
    argument names where params.yaml has dotted keys."""
    from pipeline.noise_scheduler import NoiseScheduler
    from pipeline.unet import UNet

    shape = dict(base_channels=16, channel_mult=(1, 2, 2), attention_resolutions=(7,),
                 num_heads=4, norm_groups=8)
    expected = unet_problem(30, **shape)
    assert expected.startswith("image_size=30 is not divisible by 2**(levels-1)=4")
    with pytest.raises(ValueError) as err:
        UNet(1, 30, **shape)
    assert str(err.value) == expected
    with pytest.raises(ValueError) as err:
        NoiseScheduler(schedule="sigmoid", beta_start=0.2, beta_end=0.1)
    assert str(err.value) == beta_problem("sigmoid", 0.2, 0.1)
    assert str(err.value).startswith("beta_start=0.2 and beta_end=0.1")
    with pytest.raises(ValueError) as err:
        NoiseScheduler(rescale_zero_terminal_snr=True)
    assert str(err.value) == zero_terminal_snr_problem(True, "epsilon", 1000)
    NoiseScheduler(schedule="cosine", beta_start=0.2, beta_end=0.1)  # cosine ignores the betas


def run_python(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_config_does_not_import_torch(tmp_path):
    """Stages load params first; an error must come before torch's start-up time."""
    done = run_python(tmp_path, "-c", "import sys, pipeline.config; print('torch' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_preprocess_stage_stops_at_once_on_an_impossible_combination(tmp_path):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)  # empty: it must not get that far
    write(tmp_path, "preprocess:\n  image_size: 30\n  data_dir: data\nmodel:\n"
                    "  attention_resolutions: [7]\n")
    done = run_python(tmp_path, "-m", "stages.preprocess")
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("preprocess: error: params.yaml: preprocess.image_size=30 is not "
                               "divisible by 2**(levels-1)=4, which model.channel_mult=[1, 2, 4]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]


@pytest.mark.parametrize(
    ("sample", "fragments"),
    [
        ({"method": "heun", "s_churn": 5.0},
         ["sample.s_churn = 5.0 is read by sample.method 'edm_stochastic' only",
          "sample.method = 'heun' would ignore it", "back to 0.0"]),
        ({"method": "heun", "eta": 0.5}, ["sample.eta = 0.5 is read by sample.method 'ddim' only"]),
        ({"method": "dpmpp_2m", "variance_type": "fixed_large"},
         ["sample.variance_type = 'fixed_large' is read by sample.method 'ddpm' only"]),
        ({"method": "edm_stochastic", "s_churn": 5.0, "s_tmin": 2.0, "s_tmax": 1.0},
         ["sample.s_tmin = 2.0 is above sample.s_tmax = 1.0"]),
    ],
)
def test_a_setting_the_sampler_ignores_is_an_error(sample, fragments):
    with pytest.raises(ParamsError) as err:
        from_dict({"sample": sample})
    for fragment in fragments:
        assert fragment in str(err.value)


def test_edm_samplers_need_a_finite_sigma_max():
    with pytest.raises(ParamsError, match="infinite with diffusion.rescale_zero_terminal_snr"):
        from_dict({"sample": {"method": "heun"},
                   "diffusion": {"prediction_type": "v_prediction", "rescale_zero_terminal_snr": True}})


def test_churn_settings_and_infinity():
    p = from_dict({"sample": {"method": "edm_stochastic", "s_churn": 40, "s_tmax": "inf"}}).sample
    assert (p.s_churn, p.s_tmax) == (40.0, math.inf)
    assert SampleParams().s_tmax == math.inf
    with pytest.raises(ParamsError, match="sample.s_tmax = 'nan' must be a number, not nan"):
        from_dict({"sample": {"method": "edm_stochastic", "s_tmax": "nan"}})
    with pytest.raises(ParamsError, match=r"sample.s_noise = 0.0 is out of range; allowed: > 0"):
        from_dict({"sample": {"method": "edm_stochastic", "s_noise": 0.0}})
