"""The KL autoencoder of latent diffusion: shapes, the posterior's formulas, the loss, the scale."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from pipeline import metrics
from pipeline.autoencoder import (AUTOENCODER_FILE, LOGVAR_RANGE, Autoencoder, DiagonalGaussian,
                                  autoencoder_loss, latent_scale, load_autoencoder, psnr)
from pipeline.autoencoder_training import fingerprint, reconstruction_floor, train_autoencoder
from pipeline.checkpoint import Checkpoints
from pipeline.classifier import Classifier, save_classifier
from pipeline.config import from_dict
from pipeline.data import ImageSet, to_model_range, to_uint8
from pipeline.io import load_safetensors
from pipeline.logger import Logger

MULTS = {2: (1, 2), 4: (1, 2, 2), 8: (1, 2, 2, 2)}


def tiny_autoencoder(channels: int = 1, factor: int = 4, image_size: int = 16) -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(channels, image_size, factor, latent_channels=3, base_channels=8,
                       channel_mult=MULTS[factor], num_res_blocks=1, norm_groups=4)


@pytest.mark.parametrize("factor", [2, 4, 8])
@pytest.mark.parametrize("channels", [1, 3])
def test_encode_decode_shapes_for_every_factor(factor, channels):
    model = tiny_autoencoder(channels, factor)
    x = torch.randn(2, channels, 16, 16)
    posterior = model.encode(x)
    side = 16 // factor
    assert posterior.mean.shape == posterior.logvar.shape == (2, 3, side, side)
    assert model.latent_shape == (3, side, side)
    assert model.decode(posterior.sample()).shape == x.shape
    reconstruction, _ = model(x)
    assert reconstruction.shape == x.shape


def moments(seed: int = 0, shape=(3, 8, 4, 4)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


def test_kl_is_the_closed_form_of_torch_distributions():
    posterior = DiagonalGaussian(moments())
    mean, logvar = moments().chunk(2, dim=1)
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)),
                             Normal(torch.zeros_like(mean), torch.ones_like(mean)))
    assert torch.allclose(posterior.kl(), expected.flatten(1).sum(1), rtol=1e-5)
    standard = DiagonalGaussian(torch.zeros(2, 6, 3, 3))  # mean 0, log-variance 0: N(0, I)
    assert torch.equal(standard.kl(), torch.zeros(2))


def test_sample_is_mean_plus_std_times_the_generators_noise_and_mode_is_the_mean():
    posterior = DiagonalGaussian(moments())
    z = posterior.sample(torch.Generator().manual_seed(5))
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(z, posterior.mean + torch.exp(0.5 * posterior.logvar) * eps)
    assert torch.equal(posterior.mode(), posterior.mean)
    many = DiagonalGaussian(torch.tensor([1.0, math.log(4.0)]).reshape(1, 2, 1, 1).expand(
        20000, 2, 1, 1))  # mean 1, variance 4
    draws = many.sample(torch.Generator().manual_seed(0))
    assert draws.mean().item() == pytest.approx(1.0, abs=0.05)
    assert draws.std().item() == pytest.approx(2.0, abs=0.05)


def test_the_log_variance_is_clamped_as_in_the_papers_code():
    huge = torch.tensor([0.0, 0.0, -100.0, 100.0]).reshape(1, 4, 1, 1)  # means, then logvars
    posterior = DiagonalGaussian(huge)
    assert posterior.logvar.flatten().tolist() == list(LOGVAR_RANGE)
    assert torch.isfinite(posterior.kl()).all()


def test_the_loss_is_the_per_image_sum_plus_the_weighted_kl():
    x, y = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.5)
    y[1] = -1.0
    posterior = DiagonalGaussian(moments(shape=(2, 2, 2, 2)))
    loss, rec, kl = autoencoder_loss(x, y, posterior, kl_weight=0.1)
    assert rec.item() == pytest.approx((4 * 0.5 + 4 * 1.0) / 2)  # l1, per image, batch mean
    assert kl.item() == pytest.approx(posterior.kl().mean().item())
    assert loss.item() == pytest.approx(rec.item() + 0.1 * kl.item())
    _, rec, _ = autoencoder_loss(x, y, posterior, kl_weight=0.1, kind="mse")
    assert rec.item() == pytest.approx((4 * 0.25 + 4 * 1.0) / 2)
    with pytest.raises(ValueError, match="reconstruction_loss must be one of 'l1', 'mse'"):
        autoencoder_loss(x, y, posterior, 0.1, kind="l2")


def test_the_latent_scale_gives_unit_variance_on_its_latents():
    latents = 3.0 + 0.2 * torch.randn(64, 4, 7, 7, generator=torch.Generator().manual_seed(1))
    scale = latent_scale(latents)
    assert scale == pytest.approx(5.0, rel=0.02)
    assert (latents * scale).var().item() == pytest.approx(1.0, rel=1e-5)


def test_psnr_of_images_in_the_model_range():
    x = torch.zeros(2, 1, 4, 4)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 with peak 2: 10 log10(4 / 0.01)
    assert psnr(x, y)[0].item() == pytest.approx(10 * math.log10(400))
    assert psnr(x, y)[1].item() > 100  # identical images: capped, not infinite


@pytest.mark.parametrize("kwargs, message", [
    ({"factor": 4, "image_size": 18}, r"image_size=18 is not divisible by factor=4"),
    ({"factor": 8, "channel_mult": (1, 2)}, r"channel_mult=\[1, 2\] must have .* 4 entries"),
    ({"factor": 3}, r"factor=3 must be 2, 4 or 8"),
    ({"norm_groups": 3}, r"norm_groups=3 must divide base_channels=8"),
])
def test_an_impossible_shape_raises_naming_the_arguments(kwargs, message):
    args = {"channels": 1, "image_size": 16, "factor": 4, "base_channels": 8,
            "channel_mult": (1, 2, 2), "norm_groups": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        Autoencoder(**args)


# Training: a tiny autoencoder on 8 px images, f = 2.
TINY = {"preprocess": {"image_size": 8, "channels": 1},
        "autoencoder": {"factor": 2, "latent_channels": 2, "base_channels": 8,
                        "channel_mult": [1, 2], "norm_groups": 4, "steps": 4, "batch_size": 4,
                        "log_every": 2, "checkpoint_every": 2, "eval_images": 6,
                        "grid_images": 5, "lr": 0.002}}


class Recorder(Logger):
    """Keeps what it is given; raises KeyboardInterrupt when asked to log step `stop_at`."""

    def __init__(self, stop_at=None):
        self.metrics, self.images, self.stop_at = [], [], stop_at

    def last_step(self, key):
        steps = [s for s, m in self.metrics if key in m] + [s for k, s in self.images if k == key]
        return max(steps, default=None)

    def log_metrics(self, metrics, step):
        if step == self.stop_at:
            raise KeyboardInterrupt  # as if the process died here
        self.metrics.append((step, metrics))

    def log_image(self, image, key, step):
        self.images.append((key, step))


def tiny_sets():
    images = torch.randint(0, 256, (22, 1, 8, 8), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    return (ImageSet(images[:16], torch.zeros(16).long(), ("x",)),
            ImageSet(images[16:], torch.zeros(6).long(), ("x",)))


def run(folder, logger=None, **changes):
    params = from_dict({**TINY, "autoencoder": {**TINY["autoencoder"], **changes}},
                       check_combinations=False)  # the UNet of the defaults is not for 8 px
    data, reference = tiny_sets()
    checkpoints = Checkpoints(folder / "checkpoints", fingerprint(params, data))
    return train_autoencoder(params, data, reference, folder, logger or Recorder(), checkpoints,
                             run_id="run-1", device=torch.device("cpu"))


def test_training_logs_losses_psnr_and_the_grid_and_saves_the_scale(tmp_path):
    logger = Recorder()
    result = run(tmp_path, logger)
    assert [s for s, _ in logger.metrics] == [2, 4, 4]
    assert set(logger.metrics[0][1]) == {"loss", "reconstruction", "kl"}
    assert logger.metrics[-1][1] == {"psnr": result.psnr, "latent_scale": result.latent_scale}
    assert logger.images == [("reconstructions", 4)]
    assert result.grid.size == (2 + 5 * 10, 2 + 2 * 10)  # 5 originals over 5 reconstructions
    trained = load_autoencoder(tmp_path / AUTOENCODER_FILE)
    assert trained.latent_scale == result.latent_scale and trained.step == 4
    assert trained.run_id == "run-1" and trained.params.autoencoder.factor == 2
    data, _ = tiny_sets()
    with torch.no_grad():
        latents = trained.encode(to_model_range(data.images))
        assert latents.shape == (16, 2, 4, 4)
        assert latents.var().item() == pytest.approx(1.0, rel=1e-4)  # unit variance on its data
        assert trained.decode(latents).shape == (16, 1, 8, 8)


def test_interrupted_autoencoder_training_resumes_bit_exactly(tmp_path):
    """Killed while logging step 4 (the last checkpoint is step 2), then started again: the
    same weights and scale, bit for bit, as the run that was not interrupted."""
    clean = run(tmp_path / "clean")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", Recorder(stop_at=4))
    logger = Recorder()
    resumed = run(tmp_path / "resumed", logger)
    assert [s for s, _ in logger.metrics] == [4, 4]  # it went on from step 2
    assert resumed.state.history == clean.state.history
    a, b = (load_safetensors(tmp_path / f / AUTOENCODER_FILE)[0] for f in ("clean", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.latent_scale == clean.latent_scale


def test_the_floors_params_are_no_part_of_the_run_so_a_rerun_trains_no_step(tmp_path):
    """A change to sample.num_images or an evaluate key re-runs the stage (dvc.yaml): it resumes
    the finished run at its last step and trains nothing, to the same weights."""
    data, _ = tiny_sets()
    scored_otherwise = {**TINY, "sample": {"num_images": 7},
                        "evaluate": {"kid_subset_size": 3, "batch_size": 5, "seed": 9}}
    assert (fingerprint(from_dict(scored_otherwise, check_combinations=False), data)
            == fingerprint(from_dict(TINY, check_combinations=False), data))
    first = run(tmp_path)
    logger = Recorder()
    again = run(tmp_path, logger)
    assert [s for s, m in logger.metrics] == [4] and "loss" not in logger.metrics[0][1]
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                  again.model.state_dict().values()))


class Identity(nn.Module):
    """A perfect autoencoder: the posterior's mode is the image itself, decoded as it is."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))  # where the model is, as a real one says

    def encode(self, x):
        return DiagonalGaussian(torch.cat([x, torch.zeros_like(x)], dim=1))

    def decode(self, z):
        return z


@pytest.fixture(scope="module")
def floor_setup(tmp_path_factory):
    """Sets to score on (more images than tiny_sets, for a covariance of the features), an
    untrained classifier's features, evaluate's settings with a seed other than the run's."""
    torch.manual_seed(0)
    classifier = tmp_path_factory.mktemp("classifier") / "model.pt"
    save_classifier(Classifier(channels=1, num_classes=2, feature_dim=8), classifier)
    images = torch.randint(0, 256, (140, 1, 8, 8), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)
    train = ImageSet(images[:80], torch.arange(80) % 2, ("a", "b"))
    reference = ImageSet(images[80:], torch.arange(60) % 2, ("a", "b"))
    params = from_dict({**TINY, "sample": {"num_images": 40},
                        "evaluate": {"kid_subset_size": 20, "batch_size": 32, "seed": 3}},
                       check_combinations=False)
    return classifier, train, reference, params


def test_the_reconstruction_floor_scores_evaluates_floor_images_through_the_autoencoder(
        tmp_path, floor_setup):
    classifier, train, reference, params = floor_setup
    model = run(tmp_path).model
    got = reconstruction_floor(model, params, train, reference, classifier)
    # Made here, not by the library: evaluate.seed's 40 training images, encoded to their
    # posterior modes, decoded, clipped and rounded to uint8 as samples are.
    pick = torch.randperm(80, generator=torch.Generator().manual_seed(3))[:40]
    with torch.no_grad():
        decoded = model.decode(model.encode(to_model_range(train.images[pick])).mode())
    settings = dict(extractor=metrics.CLASSIFIER_EXTRACTOR, weights=str(classifier),
                    kid_subset_size=20, batch_size=32, seed=3)
    expected = metrics.fid_kid(to_uint8(decoded.clamp(-1, 1)), reference.images, **settings)
    assert got["reconstruction_classifier_fd"] == pytest.approx(expected["fd"], rel=1e-9)
    assert got["reconstruction_classifier_kid"] == pytest.approx(expected["kid"], rel=1e-9)
    # The floor beside it is evaluate's, for as many samples as sample.num_images.
    samples = reference.images[:40]
    evaluated = metrics.domain_metrics(samples, torch.zeros(40).long(), train.images,
                                       reference.images, reference.labels, reference.classes,
                                       classifier, kid_subset_size=20, batch_size=32, seed=3)
    assert got["floor_classifier_fd"] == evaluated["floor_classifier_fd"]
    assert got["floor_classifier_kid"] == evaluated["floor_classifier_kid"]
    assert got["reconstruction_classifier_fd"] != got["floor_classifier_fd"]


def test_perfect_reconstructions_score_the_floor_exactly(floor_setup):
    classifier, train, reference, params = floor_setup
    got = reconstruction_floor(Identity(), params, train, reference, classifier)
    assert got["reconstruction_classifier_fd"] == got["floor_classifier_fd"]
    assert got["reconstruction_classifier_kid"] == got["floor_classifier_kid"]
    assert got["floor_classifier_fd"] > 0  # 40 of 80 noise images against 60 others


def test_the_stage_in_pixel_space_writes_only_the_marker_at_once(tmp_path, monkeypatch):
    from stages import train_autoencoder as stage
    from stages.paths import AUTOENCODER_DIR, AUTOENCODER_METRICS

    monkeypatch.chdir(tmp_path)  # no data, no MLflow store: the pixel space needs neither
    (tmp_path / "params.yaml").write_text("model:\n  space: pixel\n")
    stage.main()
    assert [p.name for p in AUTOENCODER_DIR.iterdir()] == ["not_needed.json"]
    assert json.loads((AUTOENCODER_DIR / "not_needed.json").read_text())["autoencoder"] is None
    assert json.loads(AUTOENCODER_METRICS.read_text()) == {}
    stage.main()  # again: the same bytes, so DVC sees no change
    assert [p.name for p in AUTOENCODER_DIR.iterdir()] == ["not_needed.json"]


def test_the_pixel_space_marker_imports_neither_mlflow_nor_the_autoencoder(tmp_path):
    """Every pixel-space `dvc repro` starts this stage: its start-up is MLflow's import if it
    imports the modules of the latent path (about 7 s on the 2-core CI machines)."""
    (tmp_path / "params.yaml").write_text("model:\n  space: pixel\n")
    heavy = ("mlflow", "pipeline.autoencoder_training", "pipeline.tracking", "pipeline.classifier")
    code = ("import sys\nfrom stages import train_autoencoder\ntrain_autoencoder.main()\n"
            f"print([m for m in {heavy!r} if m in sys.modules])")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    assert (tmp_path / "outputs/autoencoder/model/not_needed.json").exists()
