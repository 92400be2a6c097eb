"""The KL autoencoder of latent diffusion: shapes, the posterior's formulas, the loss, the scale."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from pipeline.autoencoder import (LOGVAR_RANGE, Autoencoder, DiagonalGaussian, autoencoder_loss,
                                  latent_scale, psnr)

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
