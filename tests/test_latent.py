"""Diffusion in latent space (Rombach et al. 2022): the cached latents, training on them, sampling
decoded images through every user of the model file, the run identity, the refusals."""

import dataclasses
import hashlib
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from pipeline import inference
from pipeline.autoencoder import AUTOENCODER_FILE, LATENTS, load_autoencoder
from pipeline.autoencoder_training import fingerprint as autoencoder_fingerprint
from pipeline.autoencoder_training import train_autoencoder
from pipeline.checkpoint import Checkpoints
from pipeline.config import ParamsError, from_dict, sample_params
from pipeline.data import ImageSet, grid_image, to_model_range
from pipeline.diffusers_map import unexpressible
from pipeline.generate import main as generate_cli
from pipeline.inference import generate, write_samples
from pipeline.logger import Logger
from pipeline.model_file import EMA_FILE, load_ema_model, read_model_file, save_ema_model
from pipeline.training import fingerprint, train

TINY = {"preprocess": {"image_size": 8, "channels": 1},
        "autoencoder": {"factor": 2, "latent_channels": 2, "base_channels": 8,
                        "channel_mult": [1, 2], "norm_groups": 4, "steps": 4, "batch_size": 4,
                        "log_every": 2, "checkpoint_every": 4, "eval_images": 6,
                        "grid_images": 4, "lr": 0.002},
        "model": {"space": "latent", "base_channels": 8, "channel_mult": [1, 2],
                  "attention_resolutions": [2], "num_heads": 2, "norm_groups": 4,
                  "num_classes": 2},
        "diffusion": {"num_timesteps": 50},
        "sample": {"num_steps": 3},
        "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "log_every": 2,
                  "checkpoint_every": 2, "sample_every": 4, "grid_images": 4,
                  "grid_sampling_steps": 3, "precision": "fp32", "cond_drop_prob": 0.2}}
CPU = torch.device("cpu")


def tiny_params(**sections):
    return from_dict({key: {**values, **sections.get(key, {})} for key, values in TINY.items()})


class Recorder(Logger):
    """Keeps the logged steps and images; raises KeyboardInterrupt when asked to log `stop_at`."""

    def __init__(self, stop_at=None):
        self.metrics, self.images, self.stop_at = [], [], stop_at

    def last_step(self, key):
        return max([s for s, m in self.metrics if key in m], default=None)

    def log_metrics(self, metrics, step):
        if step == self.stop_at:
            raise KeyboardInterrupt
        self.metrics.append((step, metrics))

    def log_image(self, image, key, step):
        self.images.append((key, image))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The CPU is shared: more threads only wait for each other (tiny tensors, seconds a step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny autoencoder, its latents of 16 images, and a latent model trained on them."""
    root = tmp_path_factory.mktemp("latent")
    params = tiny_params()
    images = torch.randint(0, 256, (22, 1, 8, 8), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    data = ImageSet(images[:16], torch.arange(16) % 2, ("a", "b"))
    reference = ImageSet(images[16:], torch.arange(6) % 2, ("a", "b"))
    checkpoints = Checkpoints(root / "ae-checkpoints", autoencoder_fingerprint(params, data))
    train_autoencoder(params, data, reference, root / "autoencoder", Logger(), checkpoints,
                      device=CPU)
    autoencoder = load_autoencoder(root / "autoencoder" / AUTOENCODER_FILE)
    latents = ImageSet.load(root / "autoencoder" / LATENTS)
    logger = Recorder()
    train(params, latents, root / "train", logger, autoencoder=autoencoder)
    return SimpleNamespace(root=root, params=params, data=data, autoencoder=autoencoder,
                           latents=latents, logger=logger,
                           model=load_ema_model(root / "train" / EMA_FILE, CPU))


def test_the_latents_are_the_scaled_posterior_modes_of_the_training_images(trained):
    latents = trained.latents
    assert latents.images.dtype == torch.float32 and latents.images.shape == (16, 2, 4, 4)
    assert torch.equal(latents.labels, trained.data.labels) and latents.classes == ("a", "b")
    with torch.no_grad():
        encoded = trained.autoencoder.encode(to_model_range(trained.data.images))
    torch.testing.assert_close(latents.images, encoded, rtol=0, atol=1e-6)


def test_the_model_file_carries_its_autoencoder_and_the_grids_are_images(trained):
    saved = read_model_file(trained.root / "train" / EMA_FILE)
    assert saved.params.model.space == "latent"
    assert saved.autoencoder.sha256 == trained.autoencoder.sha256 == hashlib.sha256(
        (trained.root / "autoencoder" / AUTOENCODER_FILE).read_bytes()).hexdigest()
    assert saved.autoencoder.latent_scale == trained.autoencoder.latent_scale
    assert not [k for k in saved.weights if k.startswith("autoencoder.")]  # the UNet's alone
    assert trained.model.model.in_channels == 2 and trained.model.model.image_size == 4
    (key, grid), = trained.logger.images
    assert key == "sample_grid"
    assert grid.size == grid_image(torch.zeros(4, 1, 8, 8, dtype=torch.uint8)).size  # 8 px, grey


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmpp_2m", "heun", "edm_stochastic"])
def test_every_sampler_with_guidance_draws_decoded_unclipped_images(trained, method, monkeypatch,
                                                                    tmp_path):
    clipped = []
    real = inference.sample
    monkeypatch.setattr(inference, "sample",
                        lambda *a, **k: clipped.append(k["clip_sample"]) or real(*a, **k))
    p = sample_params({"method": method, "num_steps": 3, "guidance_scale": 1.5, "batch_size": 2,
                       "precision": "fp32"})
    assert p.clip_sample  # on, as by default: latents are not clipped all the same
    images, steps = generate(trained.model, p, num_images=3, return_intermediates=True,
                             progress=False)
    assert images.dtype == torch.uint8 and images.shape == (3, 1, 8, 8)
    assert steps and steps[0].shape == (2, 1, 8, 8)  # the first batch's x0 estimates, decoded
    assert clipped == [False, False]
    write_samples(images, tmp_path)
    with Image.open(tmp_path / "00000.png") as png:
        assert (png.size, png.mode) == ((8, 8), "L")


def test_only_the_intermediates_asked_for_are_decoded(trained, monkeypatch):
    """The sample stage asks for the progression figure's rows: a decoder pass per step for
    each of those, not for the whole first batch (25 steps x 250 latents took 43 s on CPU)."""
    p = sample_params({"method": "ddim", "num_steps": 3, "batch_size": 3, "precision": "fp32"})
    _, every = generate(trained.model, p, num_images=3, return_intermediates=True, progress=False)
    decoded = []
    kind = type(trained.model.autoencoder)
    decode = kind.decode
    monkeypatch.setattr(kind, "decode", lambda self, z: decoded.append(len(z)) or decode(self, z))
    _, first = generate(trained.model, p, num_images=3, return_intermediates=True,
                        progress=False, intermediate_images=1)
    assert decoded == [3] + [1] * 3  # the samples, then one latent per step
    assert [x.shape[0] for x in first] == [1] * 3
    for one, all_three in zip(first, every):
        assert (one.int() - all_three[:1].int()).abs().max() <= 1  # uint8, same latent


def test_the_generate_cli_draws_a_latent_models_images(trained, tmp_path, capsys):
    generate_cli(["--model", str(trained.root / "train" / EMA_FILE), "--num", "3", "--method",
                  "ddim", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "g.png")])
    with Image.open(tmp_path / "g.png") as png:
        assert png.size == grid_image(torch.zeros(3, 1, 8, 8, dtype=torch.uint8)).size
    assert "generate: 3 images with ddim, 2 steps" in capsys.readouterr().out


def test_the_run_identity_changes_with_the_autoencoder(trained):
    identity = fingerprint(trained.params, trained.latents, 1, trained.autoencoder)
    other = dataclasses.replace(trained.autoencoder, sha256="0" * 64)
    assert fingerprint(trained.params, trained.latents, 1, other) != identity
    assert fingerprint(trained.params, trained.latents, 1, trained.autoencoder) == identity


def test_latent_training_resumes_bit_exactly_with_every_loss_option(trained, tmp_path):
    """Self-conditioning, Min-SNR weights, offset noise, micro-batches, v-prediction on latents:
    killed before logging step 4 (the last checkpoint is step 2), then resumed: the same EMA
    weights, bit for bit, as the run that was not interrupted."""
    params = tiny_params(model={"self_condition": True},
                         diffusion={"prediction_type": "v_prediction"},
                         train={"min_snr_gamma": 5.0, "offset_noise": 0.1,
                                "micro_batch_size": 4, "sample_every": 100})
    train(params, trained.latents, tmp_path / "clean", Logger(), autoencoder=trained.autoencoder)
    with pytest.raises(KeyboardInterrupt):
        train(params, trained.latents, tmp_path / "resumed", Recorder(stop_at=4),
              autoencoder=trained.autoencoder)
    logger = Recorder()
    train(params, trained.latents, tmp_path / "resumed", logger, autoencoder=trained.autoencoder)
    assert [s for s, _ in logger.metrics] == [4]  # it went on from step 2
    clean, resumed = (read_model_file(tmp_path / f / EMA_FILE).weights
                      for f in ("clean", "resumed"))
    assert clean.keys() == resumed.keys() and all(torch.equal(clean[k], resumed[k]) for k in clean)


def test_an_edm_latent_model_trains_and_draws_decoded_images(trained, tmp_path):
    params = from_dict({**TINY, "diffusion": {"formulation": "edm", "sigma_data": 1.0},
                        "sample": {"method": "heun", "num_steps": 3}})
    train(params, trained.latents, tmp_path, Logger(), autoencoder=trained.autoencoder)
    model = load_ema_model(tmp_path / EMA_FILE, CPU)
    p = sample_params({"method": "heun", "num_steps": 2, "precision": "fp32"})
    images, _ = generate(model, p, num_images=2, progress=False)
    assert images.dtype == torch.uint8 and images.shape == (2, 1, 8, 8)


def test_what_cannot_work_in_latent_space_is_refused_naming_the_param(trained):
    params = trained.params
    with pytest.raises(ValueError, match=r"model.space = 'latent' needs the trained autoencoder"):
        train(params, trained.latents, trained.root / "no", Logger())
    with pytest.raises(ValueError, match=r"model.space = 'latent': the UNet denoises latents"):
        train(params, trained.data, trained.root / "no", Logger(), autoencoder=trained.autoencoder)
    with pytest.raises(ParamsError, match=r"train.hflip = True mirrors the training data"):
        tiny_params(train={"hflip": True})
    assert unexpressible(params).startswith("model.space = 'latent'")
    pixel = tiny_params(model={"space": "pixel", "attention_resolutions": [4]})
    with pytest.raises(ValueError, match=r"model.space = 'pixel'"):
        save_ema_model(trained.root / "no.safetensors", pixel, {}, (), None, 0,
                       trained.autoencoder)
