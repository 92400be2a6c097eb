"""The forward (noising) process of a DDPM and the conversions the samplers need.

:class:`NoiseScheduler` holds a variance schedule beta_t of the forward process
q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) and what follows from it:
alpha_t = 1 - beta_t and abar_t = prod_{s <= t} alpha_s. Training uses :meth:`draw_timesteps`,
:meth:`add_noise` and :meth:`get_target` (pipeline/edm.py's EDM offers the same three);
sampling uses :meth:`predict_x0` / :meth:`predict_noise` and the posterior q(x_{t-1} | x_t, x_0).
Two training options act on the noise and the loss: :func:`offset_noise` and :func:`min_snr_weights`.

Timesteps are zero-based: index t in {0, ..., T-1} is step t + 1 of the DDPM paper. Index t = -1
stands for the clean data (abar = 1), the level a sampler reaches after its last step.

The posterior is written in terms of two noise levels, abar_t and abar_prev
(:func:`posterior_coefficients`), so the same formulas serve the full chain (abar_prev = abar_{t-1})
and a respaced chain that jumps between two arbitrary timesteps (IDDPM sec. 4).

References:
    [DDPM]  Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239.
    [IDDPM] Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models",
            arXiv:2102.09672.
    [LDM]   Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
            arXiv:2112.10752 (the "scaled_linear" schedule).
    [GeoDiff] Xu et al. 2022, "GeoDiff: a Geometric Diffusion Model for Molecular Conformation
            Generation", arXiv:2203.02923 (the "sigmoid" schedule).
    [PD]    Salimans, Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models",
            arXiv:2202.00512 (v-prediction).
    [ZSNR]  Lin, Liu, Li, Yang 2023, "Common Diffusion Noise Schedules and Sample Steps are
            Flawed", arXiv:2305.08891 (zero terminal SNR).
    [MinSNR] Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
            arXiv:2303.09556.
    [Offset] Guttenberg 2023, "Diffusion with Offset Noise", crosslabs.org/blog/diffusion-with-offset-noise.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import Tensor

from pipeline.config import (Params, PredictionType, Schedule, VarianceType,
                             beta_problem, check_choice, choices, zero_terminal_snr_problem)
from pipeline.edm import EDM

SCHEDULES = choices(Schedule)

COSINE_OFFSET = 0.008  # s of IDDPM eq. 17: keeps beta_t from being vanishingly small near t = 0
MAX_BETA = 0.999  # IDDPM sec. 3.2: caps cosine betas to avoid the singularity at t = T

# A noise level abar: a Python float (samplers, per step) or a tensor of per-sample levels.
Level = TypeVar("Level", float, Tensor)


def make_betas(schedule: str, num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """beta_t for t = 0..T-1 of a named schedule, in float64.

    ``beta_start`` and ``beta_end`` are the first and last beta of every schedule but "cosine",
    which is defined by abar alone (IDDPM eq. 17) and ignores them.
    """
    check_choice("schedule", schedule, Schedule)
    if schedule == "cosine":
        return _cosine_betas(num_timesteps)
    if schedule == "linear":  # DDPM sec. 4, without IDDPM's 1000 / T rescaling
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":  # LDM: linear in sqrt(beta)
        sqrt_betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64)
        return sqrt_betas**2
    if schedule == "sigmoid":  # GeoDiff: a sigmoid ramp from beta_start to beta_end
        ramp = torch.sigmoid(torch.linspace(-6.0, 6.0, num_timesteps, dtype=torch.float64))
        return ramp * (beta_end - beta_start) + beta_start
    # "exponential": evenly spaced in log(beta), i.e. a geometric sequence
    log_betas = torch.linspace(math.log(beta_start), math.log(beta_end), num_timesteps, dtype=torch.float64)
    return log_betas.exp()


def _cosine_betas(num_timesteps: int) -> Tensor:
    """IDDPM eq. 17: abar(u) proportional to cos^2(((u + s) / (1 + s)) pi / 2), u = t / T.

    beta_t = 1 - abar((t + 1) / T) / abar(t / T), capped at MAX_BETA (the normalisation f(0) of
    eq. 17 cancels in the ratio).
    """
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)


def enforce_zero_terminal_snr(betas: Tensor) -> Tensor:
    """ZSNR Algorithm 1: rescale a schedule so the last step is pure noise (abar_{T-1} = 0).

    sqrt(abar) is shifted so its last value is 0 and scaled so its first value is unchanged; the
    betas are then recovered from the ratios of consecutive abar.
    """
    sqrt_alpha_bar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].item(), sqrt_alpha_bar[-1].item()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def posterior_coefficients(
    alpha_bar: Level, alpha_bar_prev: Level, variance_type: str = "fixed_small"
) -> tuple[Level, Level, Level]:
    """The Gaussian q(x_prev | x_t, x_0) between noise levels abar_t < abar_prev (DDPM eqs. 6-7).

    Returns (coef_x0, coef_xt, variance), the posterior mean being coef_x0 x_0 + coef_xt x_t.
    The step between the two levels has the effective beta = 1 - abar_t / abar_prev (IDDPM
    sec. 4), which is beta_t itself when abar_prev = abar_{t-1}; abar_prev = 1 is the step onto
    clean data. Works elementwise on floats or on tensors of levels.

    ``variance_type``: "fixed_small" is the posterior variance beta_tilde = beta (1 - abar_prev) /
    (1 - abar_t); "fixed_large" is beta (DDPM sec. 3.2: the two extremes of the reverse variance).
    """
    check_choice("variance_type", variance_type, VarianceType)
    alpha = alpha_bar / alpha_bar_prev
    beta = 1 - alpha
    coef_x0 = alpha_bar_prev**0.5 * beta / (1 - alpha_bar)
    coef_xt = alpha**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
    variance = beta * (1 - alpha_bar_prev) / (1 - alpha_bar) if variance_type == "fixed_small" else beta
    return coef_x0, coef_xt, variance


def min_snr_weights(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma loss weights (MinSNR) of the MSE on the ``prediction_type`` target, per SNR.

    MinSNR weighs the loss in x0 space by min(SNR, gamma), so that low-noise steps, which are easy
    and would dominate the gradient, count no more than those at SNR = gamma. The MSE on the noise
    is SNR times the x0 one, and the MSE on v is (SNR + 1) times it, so the same weighting reads
    min(SNR, gamma) / SNR for "epsilon", min(SNR, gamma) for "sample", min(SNR, gamma) / (SNR + 1)
    for "v_prediction".
    """
    check_choice("prediction_type", prediction_type, PredictionType)
    if prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR, and its limit 1 at SNR = 0
    clipped = snr.clamp(max=gamma)
    return clipped if prediction_type == "sample" else clipped / (snr + 1)


def offset_noise(noise: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Offset noise (Offset): ``noise`` plus ``strength`` times one N(0, 1) value per image and channel.

    Gaussian noise per pixel barely changes an image's mean colour, so a model trained with it
    cannot learn to change that mean either (its samples stay near mid-grey on average); the shared
    offset per channel adds that low-frequency component to the forward process.
    """
    offset = torch.randn(noise.shape[:2], generator=generator, device=noise.device)
    return noise + strength * offset.view(*noise.shape[:2], *[1] * (noise.ndim - 2))


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    """Per-sample values of shape [batch] -> [batch, 1, ..., 1] in the dtype and device of ``like``."""
    # Cast before moving: some accelerators (MPS) have no float64.
    return values.to(like.dtype).to(like.device).view(-1, *([1] * (like.ndim - 1)))


class NoiseScheduler:
    """A DDPM forward process: its schedule and the conversions between x_0, noise and x_t.

    ``betas``, ``alphas`` and ``alphas_cumprod`` are float32 tensors of length ``num_timesteps``
    (computed in float64). Methods take ``t`` as a long tensor of shape [batch] and broadcast
    per-sample coefficients over the remaining dimensions of the images; the conversions between
    x_0, noise and x_t also take a plain int, one timestep for the whole batch, which keeps their
    coefficients Python floats (cheap per sampling step). Methods that return coefficients
    (:meth:`alpha_bar`, :meth:`snr`, :meth:`posterior_mean_coefficients`,
    :meth:`posterior_variance`) return float64 tensors of shape [batch] on the CPU.

    Args:
        num_timesteps: T, the number of forward steps.
        schedule: one of SCHEDULES (see :func:`make_betas`).
        beta_start: first beta of the schedule (unused by "cosine").
        beta_end: last beta of the schedule (unused by "cosine").
        prediction_type: what the model predicts: "epsilon" (the noise, DDPM), "sample" (x_0) or
            "v_prediction" (v = sqrt(abar) noise - sqrt(1 - abar) x_0, PD sec. 4).
        rescale_zero_terminal_snr: rescale the schedule so abar_{T-1} = 0 (ZSNR Algorithm 1).
            Needs prediction_type "v_prediction" or "sample": at abar = 0 the input is pure noise
            and x_0 cannot be recovered from a noise prediction.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
        rescale_zero_terminal_snr: bool = False,
    ) -> None:
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be an integer >= 1; got {num_timesteps!r}")
        check_choice("prediction_type", prediction_type, PredictionType)
        problem = beta_problem(schedule, beta_start, beta_end) or zero_terminal_snr_problem(
            rescale_zero_terminal_snr, prediction_type, num_timesteps)
        if problem:  # the rules params.yaml is checked against (pipeline/config.py)
            raise ValueError(problem)

        betas = make_betas(schedule, num_timesteps, beta_start, beta_end)
        if rescale_zero_terminal_snr:
            betas = enforce_zero_terminal_snr(betas)
        alpha_bar = torch.cumprod(1 - betas, dim=0)

        self.num_timesteps = num_timesteps
        self.prediction_type = prediction_type
        self.betas = betas.float()
        self.alphas = (1 - betas).float()
        self.alphas_cumprod = alpha_bar.float()
        # float64 abar with abar_{-1} = 1 in front, so that index t + 1 serves t = -1 as well.
        self._alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar])

    def alpha_bar(self, t: Tensor) -> Tensor:
        """abar_t in float64 for integer timesteps t in [-1, T-1]; t = -1 gives 1 (clean data)."""
        return self._alpha_bar[t.cpu() + 1]

    def _scales(self, t: Tensor | int, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """sqrt(abar_t) and sqrt(1 - abar_t): floats for an int t, else broadcastable to ``like``."""
        if isinstance(t, int):
            alpha_bar = self._alpha_bar[t + 1].item()
            return math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
        alpha_bar = self.alpha_bar(t)
        return _broadcast(alpha_bar.sqrt(), like), _broadcast((1 - alpha_bar).sqrt(), like)

    def draw_timesteps(self, n: int, generator: torch.Generator | None = None,
                       device: str | torch.device = "cpu") -> Tensor:
        """Training timesteps t ~ Uniform{0, ..., T-1} (DDPM Algorithm 1, line 3)."""
        return torch.randint(self.num_timesteps, (n,), generator=generator, device=device)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (DDPM eq. 4)."""
        signal, sigma = self._scales(t, x0)
        return signal * x0 + sigma * noise

    def get_target(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """The regression target of the model for ``prediction_type`` at x_t = add_noise(x0, noise, t)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        signal, sigma = self._scales(t, x0)
        return signal * noise - sigma * x0  # v, PD sec. 4

    def predict_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        """x_0 implied by a model output of ``prediction_type`` at x_t (inverse of :meth:`get_target`)."""
        if self.prediction_type == "sample":
            return model_output
        signal, sigma = self._scales(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - sigma * model_output) / signal  # DDPM eq. 4 solved for x_0
        return signal * x_t - sigma * model_output  # PD sec. 4: x_0 = sqrt(abar) x_t - sqrt(1 - abar) v

    def predict_noise(self, model_output: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        """The noise implied by a model output of ``prediction_type`` at x_t."""
        if self.prediction_type == "epsilon":
            return model_output
        signal, sigma = self._scales(t, x_t)
        if self.prediction_type == "sample":
            return (x_t - signal * model_output) / sigma  # DDPM eq. 4 solved for the noise
        return sigma * x_t + signal * model_output  # PD sec. 4: eps = sqrt(1-abar) x_t + sqrt(abar) v

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) of x_t (Kingma et al. 2021, VDM)."""
        alpha_bar = self.alpha_bar(t)
        return alpha_bar / (1 - alpha_bar)

    def posterior_mean_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(coef_x0, coef_xt) of the mean of q(x_{t-1} | x_t, x_0) (DDPM eq. 7)."""
        coef_x0, coef_xt, _ = posterior_coefficients(self.alpha_bar(t), self.alpha_bar(t - 1))
        return coef_x0, coef_xt

    def posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of q(x_{t-1} | x_t, x_0) (DDPM eq. 7)."""
        coef_x0, coef_xt = self.posterior_mean_coefficients(t)
        return _broadcast(coef_x0, x_t) * x0 + _broadcast(coef_xt, x_t) * x_t

    def posterior_variance(self, t: Tensor, variance_type: str = "fixed_small") -> Tensor:
        """Reverse-step variance: beta_tilde_t (DDPM eq. 7, 0 at t = 0) or beta_t ("fixed_large")."""
        return posterior_coefficients(self.alpha_bar(t), self.alpha_bar(t - 1), variance_type)[2]


def build_scheduler(params: Params) -> NoiseScheduler | EDM:
    """The forward process that params.diffusion describes (beside pipeline.unet.build_model):
    DDPM's, or EDM's (pipeline/edm.py) with diffusion.formulation: edm."""
    d = params.diffusion
    if d.formulation == "edm":
        return EDM(d.sigma_data, d.sigma_min, d.sigma_max, d.p_mean, d.p_std)
    return NoiseScheduler(d.num_timesteps, d.schedule, d.beta_start, d.beta_end, d.prediction_type,
                          d.rescale_zero_terminal_snr)
