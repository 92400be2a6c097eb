"""Presets (presets/<name>.yaml, stages/preset.py), each exercised at a tiny scale so none rots:
its params validate and suit its data set, its real UNet has the documented size, it preprocesses,
trains one step and samples at its own resolution, and its `-S` options give exactly its params
when DVC applies them."""

import dataclasses
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from dvc.utils.hydra import apply_overrides
from PIL import Image

from pipeline.autoencoder import AUTOENCODER_FILE, LATENTS, build_autoencoder, load_autoencoder
from pipeline.autoencoder_training import fingerprint as autoencoder_fingerprint
from pipeline.autoencoder_training import train_autoencoder
from pipeline.checkpoint import Checkpoints
from pipeline.config import Params, ParamsError, check_data_size, flatten, from_dict, load_params
from pipeline.data import ImageSet, build_datasets
from pipeline.inference import generate
from pipeline.logger import Logger
from pipeline.model_file import EMA_FILE, load_ema_model
from pipeline.training import train
from pipeline.unet import SelfAttention, build_model, count_parameters
from test_training import Recorder
from stages.preset import KEPT, find_preset, load_preset, main, preset_names, set_options

ROOT = Path(__file__).resolve().parent.parent

# Trainable parameters of each preset's UNet, as docs/presets.md reports them.
PARAMETERS = {"mnist": 687_473, "cifar10": 35_482_627, "faces64": 18_534_017,
              "faces128": 19_196_417, "faces256": 112_616_961, "faces128_latent": 17_286_916,
              "faces256_latent": 18_537_476, "faces512_latent": 74_053_636}
# Trainable parameters of each latent preset's autoencoder, as docs/presets.md reports them.
AUTOENCODER_PARAMETERS = {"faces128_latent": 10_755_145, "faces256_latent": 10_755_145,
                          "faces512_latent": 3_883_049}
DDPM_CIFAR10_PARAMETERS = 35_746_307  # the paper's "35.7M", counted in its released checkpoint


@dataclasses.dataclass(frozen=True)
class DataSet:
    """What stages.get_data puts in data/: folders, image size and mode, training images."""
    splits: tuple[str, ...]  # () = one folder per class directly in data/
    size: tuple[int, int]  # width, height
    mode: str  # PIL mode of the files
    suffix: str
    images: int  # in the training split, or all of them without splits
    mirrored: bool  # a mirrored image is one of the data set's kind (train.hflip); a digit's is not


DATA_SETS = {"mnist": DataSet(("train", "test"), (28, 28), "L", ".png", 60_000, False),
             "cifar10": DataSet(("train", "test"), (32, 32), "RGB", ".jpg", 50_000, True),
             "orl_faces": DataSet((), (92, 112), "L", ".pgm", 400, True)}

# The slowest presets: a 113M-parameter UNet at 256x256, over 20 s on the 2-core CI machine, and
# the latent ones whose real autoencoder trains, encodes and decodes at 256 and 512 px (60 and
# 90 s on a shared 2-core Xeon, beside other tests).
SLOW = {"faces256", "faces256_latent", "faces512_latent"}


def preset_cases(slow_marked: bool = False) -> list:
    """Every preset's name, for parametrize; with slow_marked, the SLOW ones marked slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if slow_marked and n in SLOW else n
            for n in preset_names()]


def load_raw(name: str) -> dict:
    """The params sections of a preset file, as written."""
    raw = yaml.safe_load((ROOT / "presets" / f"{name}.yaml").read_text())
    raw.pop("preset")
    return raw


def test_every_preset_is_listed_with_its_parameter_count():
    assert preset_names() == sorted(PARAMETERS)


def test_presets_are_relative_to_the_shipped_params_yaml():
    """A preset lists what differs from params.yaml, taken as config.py's defaults: both agree."""
    assert load_params(ROOT / "params.yaml") == Params()


@pytest.mark.parametrize("name", preset_cases())
def test_preset_validates_and_suits_its_data_set(name):
    """Its file changes exactly the keys it lists; the params pass every check of params.yaml
    (find_preset runs them) and fit the data set it names: folders, size, channels, count."""
    preset = find_preset(name)
    raw = load_raw(name)
    changed = {k for k, v in flatten(preset.params).items() if v != flatten(Params())[k]}
    assert changed == {f"{s}.{k}" for s, keys in raw.items() for k in keys}
    data, p = DATA_SETS[preset.data], preset.params.preprocess
    assert (p.train_split, p.test_split) == (data.splits or ("", ""))
    assert p.allow_upscale == (p.image_size > min(data.size))  # only where the images need it
    assert p.channels == (3 if data.mode == "RGB" else 1)
    # Latent space trains on cached latents of the images as they are: no flips (config refuses).
    assert preset.params.train.hflip == (data.mirrored and preset.params.model.space == "pixel")
    held_out = 0 if data.splits else max(1, round(p.holdout_fraction * data.images))
    check_data_size(preset.params, data.images - held_out)  # a batch the data set can fill
    assert preset.params.train.num_processes == 1
    assert "\n" not in preset.about and preset.about


@pytest.mark.parametrize("name", preset_cases())
def test_preset_model_has_the_documented_size(name):
    model = build_model(find_preset(name).params)
    assert count_parameters(model) == pytest.approx(PARAMETERS[name], rel=0.01)


@pytest.mark.parametrize("name", sorted(AUTOENCODER_PARAMETERS))
def test_latent_preset_autoencoder_has_the_documented_size_and_4_latent_channels(name):
    params = find_preset(name).params
    assert params.model.space == "latent"
    autoencoder = build_autoencoder(params)
    assert count_parameters(autoencoder) == pytest.approx(AUTOENCODER_PARAMETERS[name], rel=0.01)
    assert params.autoencoder.factor in (4, 8) and autoencoder.latent_shape[0] == 4


def test_every_latent_preset_lists_its_autoencoder_size():
    assert sorted(AUTOENCODER_PARAMETERS) == [n for n in preset_names()
                                              if find_preset(n).params.model.space == "latent"]


def test_cifar10_model_is_the_ddpm_paper_model_less_its_middle_attention():
    """DDPM's UNet always attends in the middle (4x4, 256 channels); ours only where
    attention_resolutions lists that size, and 4 there would add attention to the 4x4 level too."""
    params = find_preset("cifar10").params
    m = params.model
    assert (m.base_channels, m.channel_mult, m.num_res_blocks, m.attention_resolutions,
            m.dropout) == (128, (1, 2, 2, 2), 2, (16,), 0.1)
    assert (params.diffusion.num_timesteps, params.diffusion.beta_start,
            params.diffusion.beta_end) == (1000, 1e-4, 0.02)
    t = params.train
    assert (t.lr, t.batch_size, t.warmup_steps, t.ema_decay, t.steps) == (2e-4, 128, 5000, 0.9999,
                                                                           800_000)
    middle_attention = count_parameters(SelfAttention(256, m.num_heads, m.norm_groups))
    assert middle_attention == 263_680
    assert count_parameters(build_model(params)) + middle_attention == DDPM_CIFAR10_PARAMETERS


def fake_data_set(root: Path, data: DataSet) -> None:
    """Two classes of noise images laid out, sized and encoded like the real data set."""
    rng = np.random.default_rng(0)
    width, height = data.size
    for split in data.splits or ("",):
        for label in ("s1", "s2"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                shape = (height, width, 3) if data.mode == "RGB" else (height, width)
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels, data.mode).save(folder / f"{i}{data.suffix}")


def tiny_run(params: Params, data_dir: Path) -> Params:
    """The preset at a tiny scale: its data layout, model, diffusion and sampler; one step of
    batch 1 in one process (a step of faces256's UNet at 256 px takes 25 s on a 2-core CPU),
    everything logged, grids of one image, 2 sampling steps (one image)."""
    raw = {section: dict(values) for section, values in dataclasses.asdict(params).items()}
    raw["preprocess"].update(data_dir=str(data_dir))
    raw["train"].update(steps=1, batch_size=1, num_processes=1, log_every=1, checkpoint_every=1,
                        sample_every=1, grid_images=1, grid_sampling_steps=1,
                        min_snr_gamma=0.0,  # plain loss: ~1 below, whatever the drawn timestep
                        # The presets' bf16 is for GPUs: on a CPU without AVX512-BF16 a faces128
                        # step took 95 s in bf16, 1.3 s in fp32 (a fallback convolution).
                        precision="fp32")
    raw["sample"].update(num_images=2, num_steps=2, batch_size=1)  # 2: the least allowed
    raw["autoencoder"].update(steps=1, batch_size=1, log_every=1, checkpoint_every=1,
                              eval_images=1, grid_images=1)
    return from_dict(raw)


def diffusion_data(params: Params, training: ImageSet, reference: ImageSet, root: Path):
    """What the UNet trains on: the images, or in latent space the latents of the preset's real
    autoencoder trained for one step, and that autoencoder (None in pixel space)."""
    if params.model.space == "pixel":
        return training, None
    checkpoints = Checkpoints(root / "ae-checkpoints", autoencoder_fingerprint(params, training))
    train_autoencoder(params, training, reference, root / "autoencoder", Logger(), checkpoints,
                      device=torch.device("cpu"))
    autoencoder = load_autoencoder(root / "autoencoder" / AUTOENCODER_FILE)
    latents = ImageSet.load(root / "autoencoder" / LATENTS)
    side = params.preprocess.image_size // params.autoencoder.factor
    assert latents.images.shape[1:] == (params.autoencoder.latent_channels, side, side)
    return latents, autoencoder


@pytest.mark.parametrize("name", preset_cases(slow_marked=True))
def test_preset_preprocesses_trains_and_samples_at_a_tiny_scale(name, tmp_path):
    preset = find_preset(name)
    fake_data_set(tmp_path / "data", DATA_SETS[preset.data])
    params = tiny_run(preset.params, tmp_path / "data")
    size, channels = params.preprocess.image_size, params.preprocess.channels
    training, reference, _ = build_datasets(params.preprocess, tmp_path / "train_set",
                                            tmp_path / "reference_set")
    assert training.images.shape[1:] == (channels, size, size) and len(reference) >= 1

    data, autoencoder = diffusion_data(params, training, reference, tmp_path)
    logger = Recorder()
    state = train(params, data, tmp_path / "train", logger, run_id="tiny", autoencoder=autoencoder)
    assert state.step == 1 and [step for step, _ in logger.metrics] == [1]
    # The UNet's last layer starts at zero, so the first step predicts ~0 and the loss is the
    # mean square of unit Gaussian noise, ~1 (a broken forward or target would show here); in
    # latent space too, and the grid is of decoded images at the preset's size.
    losses = [metrics["loss"] for _, metrics in logger.metrics]
    assert all(math.isfinite(loss) and abs(loss - 1) < 0.25 for loss in losses), losses
    assert logger.images == [("sample_grid", 1, (size + 4, size + 4))]  # 2 px frame

    trained = load_ema_model(tmp_path / "train" / EMA_FILE, torch.device("cpu"))
    assert count_parameters(trained.model) == count_parameters(build_model(preset.params))
    images, _ = generate(trained, params.sample, num_images=1)
    assert images.shape == (1, channels, size, size) and images.dtype == torch.uint8
    assert images.float().std() > 0  # noise denoised by an untrained model: not one flat colour


def apply(options: list[str], params_file: Path) -> Params:
    """What `dvc exp run -S ...` does to params.yaml before it runs, then the stages' reading."""
    assert options[::2] == ["-S"] * (len(options) // 2)
    apply_overrides(params_file, options[1::2])
    return load_params(params_file)


@pytest.mark.parametrize("name", preset_cases())
def test_options_give_the_preset_params_through_dvc(name, tmp_path):
    """Applied to the shipped params.yaml, as `$S` (split on blanks, quotes kept) and as a
    pasted line (the shell removes the quotes), the options give exactly the preset's params."""
    preset = find_preset(name)
    line = " ".join(set_options(preset, load_params(ROOT / "params.yaml")))
    for words in (line.split(), shlex.split(line)):
        params_file = tmp_path / "params.yaml"
        params_file.write_text((ROOT / "params.yaml").read_text())
        assert apply(words, params_file) == preset.params
        assert "model:                 # the UNet (pipeline/unet.py)" in params_file.read_text()
    assert (line == "") == (name == "mnist")


def test_switching_presets_leaves_nothing_behind_but_this_machine_s_settings(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text((ROOT / "params.yaml").read_text())
    own = ["tracking.uri=http://tracking.example:5000", "evaluate.inception_weights=/w/inc.pth",
           "sample.seed=7"]
    before = apply(set_options(find_preset("faces256"), Params()) + [
        word for option in own for word in ("-S", option)], params_file)
    assert before.preprocess.allow_upscale and before.train.grid_images == 16

    cifar10 = find_preset("cifar10")
    after = apply(set_options(cifar10, before), params_file)
    assert after.tracking.uri == "http://tracking.example:5000"
    assert after.evaluate.inception_weights == "/w/inc.pth"
    assert after.sample.seed == 0  # an experiment setting: back to the preset's
    kept = {k for k in flatten(Params()) if k.startswith(KEPT)}
    assert {k: v for k, v in flatten(after).items() if k not in kept} == \
           {k: v for k, v in flatten(cifar10.params).items() if k not in kept}


@pytest.mark.parametrize("text, message", [
    ("preset: {about: x, data: svhn}\n",
     "preset.data = 'svhn' is not a data set of stages.get_data; choose one of mnist, cifar10"),
    ("model: {base_channels: 32}\n", "the 'preset' section must hold exactly 'about'"),
    ("preset: {about: x, data: mnist}\ntrain: {lr: 0.002}\n",
     "train.lr = 0.002 is the default in params.yaml; leave it out"),
    ("preset: {about: x, data: mnist}\ntrain: {lerning_rate: 0.1}\n",
     "unknown key in section 'train': 'train.lerning_rate'"),
    ("preset: {about: x, data: cifar10}\npreprocess: {image_size: 32}\n",
     "model.attention_resolutions=[7]: [7] never occur"),
])
def test_a_bad_preset_file_names_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        load_preset(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_an_unknown_preset_is_named_with_the_close_and_known_ones():
    with pytest.raises(ParamsError) as err:
        find_preset("cifar")
    assert str(err.value) == (f"unknown preset 'cifar'; did you mean cifar10? presets in "
                              f"{ROOT / 'presets'}: cifar10, faces128, faces128_latent, faces256, "
                              "faces256_latent, faces512_latent, faces64, mnist")


def test_a_value_that_the_shell_would_split_is_refused():
    preset = dataclasses.replace(find_preset("mnist"), params=from_dict(
        {"preprocess": {"data_dir": "my data"}}))
    with pytest.raises(ParamsError, match="preprocess.data_dir = 'my data': a preset value"):
        set_options(preset, Params())


def test_listing_names_every_preset_and_its_data_set(capsys):
    main([])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines] == [
        [name, "data:", find_preset(name).data] for name in preset_names()]


def test_command_prints_the_options_on_stdout_and_the_data_set_on_stderr(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  steps: 10\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "stages.preset", "faces64"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    options = set_options(find_preset("faces64"), from_dict({"train": {"steps": 10}}))
    assert "-S train.steps=30000" in done.stdout and done.stdout == " ".join(options) + "\n"
    assert "uv run python -m stages.get_data orl_faces" in done.stderr


@pytest.mark.parametrize("data_dir", ["2024", "null", "true", ""])
def test_a_string_that_reads_as_a_number_or_null_stays_a_string(tmp_path, data_dir):
    preset = dataclasses.replace(find_preset("mnist"), params=from_dict(
        {"preprocess": {"data_dir": data_dir}}))
    params_file = tmp_path / "params.yaml"
    params_file.write_text("preprocess:\n  data_dir: data\n")
    assert apply(set_options(preset, Params()), params_file).preprocess.data_dir == data_dir
