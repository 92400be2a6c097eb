"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", sec. 3.1 and Appendix G): images to a small latent and
back, so that a diffusion model can work on the latent instead of the pixels.

The encoder maps an image x [B, C, H, W] to the mean and log-variance of a diagonal Gaussian
posterior q(z|x) over latents z [B, latent_channels, H/f, W/f]; the decoder maps a latent back to
an image. The downsampling factor f is 2**levels: each level but the last ends in a stride-2
conv on the encoder side, and in nearest-neighbour 2x upsampling and a conv on the decoder side.
Both sides are built of residual blocks (GroupNorm-SiLU-conv twice) and have a middle of a block,
single-head self-attention over the pixels and a block, as in the paper's code.

Training (pipeline/autoencoder_training.py) minimises a reconstruction loss plus a small weight
times KL(q(z|x) || N(0, I)) (the paper's "KL-reg.", sec. 3.1, weight ~1e-6): the KL term keeps the
latents from growing without bound, not close to a standard Gaussian. So the latents are scaled
before diffusion by `latent_scale`, 1 / their standard deviation (the paper's Appendix G, "we
rescale the latents ... to unit variance"; Stable Diffusion's scale factor). Left out of the
paper's recipe: the perceptual (LPIPS) and adversarial losses, for a small, self-contained model.

The file `autoencoder.safetensors` holds the weights and, as JSON metadata, the params that
rebuild the model, the latent scale, the MLflow run and the step (`save_autoencoder`,
`load_autoencoder`), in the style of pipeline/model_file.py. A latent model's ema.safetensors
carries the same weights and metadata, with the file's SHA-256 (`TrainedAutoencoder.metadata`,
`autoencoder_from`), so that it decodes its samples without the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Params, ReconstructionLoss, autoencoder_problem, check_choice, \
    from_dict, to_dict
from pipeline.io import load_safetensors, save_safetensors

AUTOENCODER_FILE = "autoencoder.safetensors"
LATENTS = "latents"  # the folder beside it: the training images' latents, a latent ImageSet
METADATA = ("params", "latent_scale", "run_id", "step")
LOGVAR_RANGE = (-30.0, 20.0)  # the paper's code clamps the log-variance to this range


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual connection (a 1x1 conv where widths change)."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = (nn.Conv2d(in_channels, out_channels, kernel_size=1)
                     if in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over all pixels, as a residual branch (the middle's)."""

    def __init__(self, channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # [B, H*W, C]
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


def middle(channels: int, norm_groups: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(channels, channels, norm_groups), Attention(channels, norm_groups),
                         ResBlock(channels, channels, norm_groups))


class Encoder(nn.Module):
    """x [B, C, H, W] -> the posterior's mean and log-variance, [B, 2 * latent, H/f, W/f]."""

    def __init__(self, in_channels: int, latent_channels: int, base_channels: int,
                 channel_mult: tuple[int, ...], num_res_blocks: int, norm_groups: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, kernel_size=3, padding=1)]
        ch = base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(ch, base_channels * mult, norm_groups))
                ch = base_channels * mult
            if level < len(channel_mult) - 1:
                layers.append(nn.Conv2d(ch, ch, kernel_size=3, stride=2, padding=1))
        layers += [middle(ch, norm_groups), nn.GroupNorm(norm_groups, ch), nn.SiLU(),
                   nn.Conv2d(ch, 2 * latent_channels, kernel_size=3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """z [B, latent, H/f, W/f] -> x [B, C, H, W]: the encoder's levels in reverse, each with one
    residual block more, upsampled by nearest-neighbour 2x and a conv."""

    def __init__(self, out_channels: int, latent_channels: int, base_channels: int,
                 channel_mult: tuple[int, ...], num_res_blocks: int, norm_groups: int) -> None:
        super().__init__()
        ch = base_channels * channel_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, ch, kernel_size=3, padding=1),
                                   middle(ch, norm_groups)]
        for level in reversed(range(len(channel_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(ch, base_channels * channel_mult[level], norm_groups))
                ch = base_channels * channel_mult[level]
            if level > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(ch, ch, kernel_size=3, padding=1)]
        layers += [nn.GroupNorm(norm_groups, ch), nn.SiLU(),
                   nn.Conv2d(ch, out_channels, kernel_size=3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))), from the encoder's output."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)  # as the paper's code: exp() stays finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I): the reparameterisation trick (Kingma & Welling
        2014, "Auto-Encoding Variational Bayes", sec. 2.4), so gradients reach mean and std."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely latent, the mean: what the diffusion model is trained on."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per image [B], summed over the latent's elements: for each
        element 0.5 * (mean^2 + var - 1 - log var), the closed form of the KL divergence of two
        Gaussians with the second standard (Kingma & Welling 2014, Appendix B)."""
        var = torch.exp(self.logvar)
        return 0.5 * (self.mean.pow(2) + var - 1.0 - self.logvar).flatten(1).sum(1)


class Autoencoder(nn.Module):
    """encode(x) -> DiagonalGaussian over latents; decode(z) -> images, both in the model range."""

    def __init__(self, channels: int, image_size: int, factor: int, latent_channels: int = 4,
                 base_channels: int = 32, channel_mult: tuple[int, ...] = (1, 2, 2),
                 num_res_blocks: int = 1, norm_groups: int = 8) -> None:
        super().__init__()
        problem = autoencoder_problem(image_size, factor, base_channels, channel_mult, norm_groups)
        if problem:
            raise ValueError(problem)
        self.channels, self.image_size, self.factor = channels, image_size, factor
        self.latent_channels = latent_channels
        shape = (latent_channels, base_channels, tuple(channel_mult), num_res_blocks, norm_groups)
        self.encoder = Encoder(channels, *shape)
        self.decoder = Decoder(channels, *shape)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The shape [C, H, W] of one image's latent."""
        side = self.image_size // self.factor
        return self.latent_channels, side, side

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """The reconstruction of x from a latent sampled from its posterior, and the posterior."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


def build_autoencoder(params: Params) -> Autoencoder:
    """The autoencoder that params' autoencoder section describes, for its preprocessed images."""
    a = params.autoencoder
    return Autoencoder(params.preprocess.channels, params.preprocess.image_size, a.factor,
                       a.latent_channels, a.base_channels, tuple(a.channel_mult), a.num_res_blocks,
                       a.norm_groups)


def autoencoder_loss(x: torch.Tensor, reconstruction: torch.Tensor, posterior: DiagonalGaussian,
                     kl_weight: float, kind: ReconstructionLoss = "l1"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, reconstruction term, KL term): |x - x_hat| (l1) or (x - x_hat)^2 (mse) summed over
    each image's pixels, plus kl_weight * KL(q(z|x) || N(0, I)), both averaged over the batch.

    Per-image sums and a KL weight of 1e-6 are the paper's code's (its "kl_weight"); the Adam
    optimiser makes the step size independent of the loss's overall scale."""
    check_choice("reconstruction_loss", kind, ReconstructionLoss)
    error = (x - reconstruction).abs() if kind == "l1" else (x - reconstruction).pow(2)
    reconstruction_term = error.flatten(1).sum(1).mean()
    kl_term = posterior.kl().mean()
    return reconstruction_term + kl_weight * kl_term, reconstruction_term, kl_term


def latent_scale(latents: torch.Tensor) -> float:
    """1 / the standard deviation of all elements of `latents` [N, C, h, w]: multiplied by it,
    they have unit variance (Rombach et al. 2022, Appendix G; Stable Diffusion's scale factor,
    0.18215, is this number for its autoencoder on its data)."""
    return 1.0 / latents.double().std().item()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image [B] in dB, of images in the model range [-1, 1]:
    10 log10(peak^2 / MSE), with peak = 2 the range's width."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))


@dataclass(frozen=True)
class TrainedAutoencoder:
    model: Autoencoder  # in eval mode
    latent_scale: float  # latents times this have unit variance on the training images
    params: Params  # its preprocess (image_size, channels) and autoencoder sections
    run_id: str | None  # the MLflow run of its training
    step: int
    sha256: str = ""  # of the autoencoder.safetensors it was read from: a latent run's identity

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in the model range -> scaled latents (the posterior's mode): diffusion's data."""
        return self.model.encode(x).mode() * self.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in the model range (not clipped)."""
        return self.model.decode(z / self.latent_scale)

    def metadata(self) -> dict[str, Any]:
        """The file's metadata values, with its SHA-256."""
        return {**file_metadata(self.params, self.latent_scale, self.run_id, self.step),
                "sha256": self.sha256}


def file_metadata(params: Params, scale: float, run_id: str | None, step: int
                  ) -> dict[str, Any]:
    sections = to_dict(params)
    sections = {"preprocess": {k: sections["preprocess"][k] for k in ("image_size", "channels")},
                "autoencoder": sections["autoencoder"]}
    return {"params": sections, "latent_scale": scale, "run_id": run_id, "step": step}


def save_autoencoder(path: Path, params: Params, weights: dict[str, torch.Tensor], scale: float,
                     run_id: str | None, step: int) -> None:
    if not math.isfinite(scale):
        raise ValueError(f"latent scale {scale} is not finite: the latents are constant")
    metadata = file_metadata(params, scale, run_id, step)
    save_safetensors(weights, {key: json.dumps(value) for key, value in metadata.items()}, path)


def load_autoencoder(path: Path, device: torch.device | None = None) -> TrainedAutoencoder:
    """The saved autoencoder, in eval mode on `device` (default: the CPU), with the file's
    SHA-256."""
    weights, metadata = load_safetensors(path)
    trained = autoencoder_from(weights, {key: json.loads(metadata[key]) for key in METADATA},
                               device)
    return dataclasses.replace(trained, sha256=hashlib.sha256(Path(path).read_bytes()).hexdigest())


def autoencoder_from(weights: dict[str, torch.Tensor], saved: dict[str, Any],
                     device: torch.device | None = None) -> TrainedAutoencoder:
    """The autoencoder of these weights and metadata values (the file's, or `metadata()`'s), in
    eval mode on `device` (default: the CPU)."""
    params = from_dict(saved["params"], check_combinations=False)
    model = build_autoencoder(params)
    model.load_state_dict(weights)
    model.to(device or torch.device("cpu")).eval()
    return TrainedAutoencoder(model, saved["latent_scale"], params, saved["run_id"], saved["step"],
                              saved.get("sha256", ""))
