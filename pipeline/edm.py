"""The EDM formulation of training (Karras, Aittala, Aila, Laine 2022), next to DDPM's
(pipeline/noise_scheduler.py): preconditioning, the training noise levels and the loss.

A clean image y gets noise n ~ N(0, sigma^2 I), x = y + n (EDM's variance-exploding form,
s(t) = 1). The network F becomes the denoiser of eq. 7 with Table 1's preconditioning ("Ours"):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)),
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),   c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    c_in = 1 / sqrt(sigma^2 + sigma_data^2),            c_noise = ln(sigma) / 4,

which gives the network's input and its training target unit variance at every sigma for data
of standard deviation sigma_data (appendix B.6). Training draws ln(sigma) ~ N(P_mean, P_std^2)
(Table 1, p_train) and minimises lambda(sigma) ||D(y + n; sigma) - y||^2 with
lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2, which is eq. 8's

    || F(c_in x; c_noise) - (y - c_skip x) / c_out ||^2:

plain mean squared error of F against an effective target, the form that train_step already
computes for DDPM. So :class:`EDM` offers the methods of NoiseScheduler that training and the
samplers use (`draw_timesteps`, `add_noise`, `get_target`, `predict_x0`), with x_t the network's
input c_in x.

The network's time input. Our UNet reads its noise level through the sinusoidal embedding of
pipeline/unet.py, made for DDPM's timesteps 0 .. T-1: base_channels / 2 frequencies from 1 down
to 1/10000. EDM's own networks read c_noise itself (EDMPrecond, NVlabs/edm training/networks.py),
but c_noise spans only [-1.55, 1.10] over sigma in [0.002, 80], over which 5 of the default
model's 8 frequencies turn by less than 0.1 rad: the embedding would be nearly constant. The
UNet therefore gets t = 1000 c_noise = 250 ln(sigma), which spans 2650 over that range as DDPM's
t spans 1000, so that the same embedding resolves the noise level as it does for DDPM. This t is
the "timestep" that the methods below take.

Reference:
    Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based
        Generative Models", arXiv:2206.00364 (EDM).
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import Tensor

TIME_SCALE = 1000.0  # t = TIME_SCALE * c_noise (see the module docstring)

# A noise level: a Python float (the samplers, per step) or a tensor of per-sample levels.
Level = TypeVar("Level", float, Tensor)


def _sqrt(value: Level) -> Level:
    return math.sqrt(value) if isinstance(value, float) else value.sqrt()


class EDM:
    """EDM's preconditioning (Table 1, eq. 7), training noise levels and loss target (eq. 8)."""

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 p_mean: float = -1.2, p_std: float = 1.2) -> None:
        if not 0 < sigma_min < sigma_max < math.inf or sigma_data <= 0 or p_std <= 0:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max < inf, sigma_data > 0 and "
                             f"p_std > 0; got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}, "
                             f"sigma_data={sigma_data!r}, p_std={p_std!r}")
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max
        self.p_mean, self.p_std = p_mean, p_std

    def preconditioning(self, sigma: Level) -> tuple[Level, Level, Level, Level]:
        """(c_skip, c_out, c_in, c_noise) of Table 1 at noise level sigma."""
        total = sigma**2 + self.sigma_data**2
        c_skip = self.sigma_data**2 / total
        c_out = sigma * self.sigma_data / _sqrt(total)
        c_in = 1 / _sqrt(total)
        c_noise = math.log(sigma) / 4 if isinstance(sigma, float) else sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: Level) -> Level:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Table 1)."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def timestep(self, sigma: Level) -> Level:
        """The UNet's time input at sigma: t = 1000 c_noise = 250 ln(sigma)."""
        return TIME_SCALE * self.preconditioning(sigma)[3]

    def sigma(self, t: Level) -> Level:
        """The noise level of time input t (the inverse of :meth:`timestep`)."""
        log_sigma = 4 * t / TIME_SCALE
        return math.exp(log_sigma) if isinstance(t, float) else log_sigma.exp()

    def draw_timesteps(self, n: int, generator: torch.Generator | None = None,
                       device: str | torch.device = "cpu") -> Tensor:
        """Training levels: ln(sigma) ~ N(P_mean, P_std^2) (Table 1, p_train), as time inputs t."""
        log_sigma = self.p_mean + self.p_std * torch.randn(n, generator=generator, device=device)
        return self.timestep(log_sigma.exp())

    def _coefficients(self, t: Tensor | float, like: Tensor) -> tuple[Level, Level, Level, Level]:
        """sigma, c_skip, c_out and c_in at t: floats for a float t, else broadcastable to ``like``."""
        if isinstance(t, float):
            sigma = self.sigma(t)
        else:
            sigma = self.sigma(t.to(torch.float64)).view(-1, *([1] * (like.ndim - 1)))
        c_skip, c_out, c_in, _ = self.preconditioning(sigma)
        if isinstance(t, float):
            return sigma, c_skip, c_out, c_in
        return tuple(c.to(like.dtype) for c in (sigma, c_skip, c_out, c_in))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """The network input c_in x of x = y + sigma noise, for a standard normal ``noise``."""
        sigma, _, _, c_in = self._coefficients(t, x0)
        return c_in * (x0 + sigma * noise)

    def get_target(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """Eq. 8's effective target (y - c_skip x) / c_out of F, x = y + sigma noise."""
        sigma, c_skip, c_out, _ = self._coefficients(t, x0)
        return (x0 - c_skip * (x0 + sigma * noise)) / c_out

    def predict_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """D(x; sigma) = c_skip x + c_out F (eq. 7) from F and the network input x_t = c_in x."""
        _, c_skip, c_out, c_in = self._coefficients(t, x_t)
        return c_skip * (x_t / c_in) + c_out * model_output
