"""Reverse-process samplers for a :class:`~pipeline.noise_scheduler.NoiseScheduler`: DDPM, DDIM,
DPM-Solver++(2M), EDM's Heun and stochastic samplers, and classifier-free guidance.

The first three walk a descending list of S timesteps (:func:`timesteps`) from pure noise to data. At
each step the model output is turned into a predicted clean image x0_hat (clipped to [-1, 1] when
asked), and x moves from the level abar_t to abar_prev, the level of the next timestep in the
list (1 after the last one), by an update of the same form for all samplers:

    x_prev = coef_x0 * D + coef_xt * x_t + sigma * z,    z ~ N(0, I),
    D = x0_hat + c * (x0_hat - x0_hat of the previous step),

where c = 0 (D = x0_hat) except for the second-order steps of DPM-Solver++(2M).

DDPM (Ho et al. 2020, Algorithm 2): the mean and variance of the posterior q(x_prev | x_t, x0_hat)
of the respaced chain, whose step has beta = 1 - abar_t / abar_prev (Nichol & Dhariwal 2021,
sec. 4); with S = T this is the original chain.

DDIM (Song et al. 2021, eq. 12, sigma from eq. 16 scaled by eta): the noise is re-derived from the
(clipped) x0_hat, eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t), so that x0_hat and
eps_hat are consistent, i.e. x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_hat, and the update
stays on the DDIM trajectory through x_t when clipping changes x0_hat. Substituting eps_hat into
eq. 12 gives coef_xt = sqrt(1 - abar_prev - sigma^2) / sqrt(1 - abar_t) and
coef_x0 = sqrt(abar_prev) - sqrt(abar_t) coef_xt. With eta = 1 this equals DDPM with "fixed_small".

DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): a multistep solver of the probability-flow ODE in
its data-prediction form, in lambda = log(sqrt(abar) / sqrt(1 - abar)). Its first-order step
x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (e^-h - 1) x0_hat, h = lambda_prev - lambda_t, is
DDIM with eta = 0 (substitute e^-h). Its second-order steps replace x0_hat by
D = (1 + 1 / 2r) x0_hat - (1 / 2r) x0_hat_last, r = h_last / h, i.e. c = h / (2 h_last), with
h_last the lambda step that produced the current x. The first step (no x0_hat_last yet) and the
last one onto clean data (lambda = infinity) are first order, as usual.

The step onto clean data (abar_prev = 1) returns x0_hat itself and adds no noise, so the final
samples are the last x0_hat.

Heun and EDM's stochastic sampler (Karras et al. 2022, Algorithms 1 and 2) solve the same
probability-flow ODE in the variance-exploding form of EDM: x = x_vp / sqrt(abar) with
sigma = sqrt((1 - abar) / abar) (Table 1, "VP" column: s(t) = sqrt(abar), sigma(t) as above), so
that x = x0 + sigma * noise and the ODE is dx/dsigma = (x - D(x; sigma)) / sigma (eq. 3 with
s = 1, Algorithm 1 line 4). The denoiser D(x; sigma) of a VP model is its x0_hat at the input
x_vp = sqrt(abar) x (clipped, self-conditioned as above). The model knows only its T trained
levels, so the sampler visits only those: the sigmas of eq. 5 (rho = 7, sigma_max and sigma_min
the levels of t = T-1 and t = 0) are each replaced by the level nearest to it in sigma, as EDM's
own code does for its discrete models (``round_sigma`` of its iDDPM preconditioner), and so is
the raised sigma_hat of a churned step (Algorithm 2 line 5). Near sigma_min, where eq. 5 is dense,
a large S may round two steps to the same level: that step is then a zero step (dx = 0). "heun"
takes S - 1 Heun steps (2 evaluations each) and a last Euler step to sigma = 0, which lands on
D itself (line 8 with t_N = 0): NFE = 2 S - 1. "edm_stochastic" adds noise before each step
whose sigma is in [s_tmin, s_tmax] (lines 4-6); with s_churn = 0 it is "heun", draw for draw.
A model of EDM's own formulation (pipeline/edm.py) is the same sampler on continuous sigmas: eq.
5's between its sigma_min and sigma_max, not rounded, and D(x; sigma) its preconditioned network
(eq. 7, :meth:`EDM.predict_x0` at the network input c_in x). DDPM, DDIM and DPM-Solver++ need
the timesteps of a NoiseScheduler and refuse it.

Classifier-free guidance (Ho & Salimans 2022) wraps a class-conditional model into the
``model(x_t, t)`` that the samplers take (:func:`guided`); :func:`drop_labels` is its training side.

Self-conditioning (Chen, Zhang & Hinton 2022, Algorithm 2): with ``self_condition=True`` the model
is called as ``model(x_t, t, x_self_cond=x0_hat)``, with the (clipped) x0_hat of the previous step,
zeros at the first step. The samples and the update rules are otherwise the same.

References:
    Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239.
    Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", arXiv:2010.02502.
    Lu, Zhou, Bao, Chen, Li, Zhu 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
        Probabilistic Models", arXiv:2211.01095.
    Ho, Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv:2207.12598.
    Chen, Zhang, Hinton 2022, "Analog Bits: Generating Discrete Data using Diffusion Models with
        Self-Conditioning", arXiv:2208.04202.
    Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", arXiv:2102.09672.
    Lin, Liu, Li, Yang 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
        arXiv:2305.08891 (sec. 3.3, Table 2: timestep spacings).
    Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based
        Generative Models", arXiv:2206.00364 (EDM).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from pipeline.config import (EDM_METHODS, SamplingMethod, TimestepSpacing, VarianceType, check_choice,
                             choices)
from pipeline.edm import EDM
from pipeline.noise_scheduler import NoiseScheduler, posterior_coefficients
from pipeline.progress import progress_bar

METHODS = choices(SamplingMethod)
SPACINGS = choices(TimestepSpacing)


class Update(NamedTuple):
    """One step x_prev = coef_x0 * D + coef_xt * x_t + sigma * z, D = x0_hat + c (x0_hat - x0_hat_last)."""

    coef_x0: float
    coef_xt: float
    sigma: float
    extrapolation: float = 0.0  # c; nonzero only in the second-order steps of DPM-Solver++(2M)


def timesteps(num_timesteps: int, num_steps: int, spacing: str = "leading") -> list[int]:
    """The descending timesteps a sampler visits: S = ``num_steps`` of the T = ``num_timesteps``.

    ``spacing`` (Lin et al. 2023, Table 2):
        "leading": (0, T//S, 2 T//S, ...) reversed, DDIM's uniform selection (appendix D.2); it may
            start short of T-1 (at 980 for T = 1000, S = 50).
        "trailing": round(T - i T/S) - 1 for i = 0..S-1; always starts at T-1.
        "linspace": round(linspace(0, T-1, S)) reversed.
    Rounding is half-to-even, like numpy's.
    """
    check_choice("timestep_spacing", spacing, TimestepSpacing)
    _check_num_steps(num_timesteps, num_steps)
    if spacing == "leading":
        stride = num_timesteps // num_steps
        return [i * stride for i in reversed(range(num_steps))]
    if spacing == "trailing":
        return [round(num_timesteps - i * num_timesteps / num_steps) - 1 for i in range(num_steps)]
    if num_steps == 1:  # linspace(0, T-1, 1) is [0]
        return [0]
    return [round(i * (num_timesteps - 1) / (num_steps - 1)) for i in reversed(range(num_steps))]


def _check_num_steps(num_timesteps: int, num_steps: int) -> None:
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be an integer in [1, {num_timesteps}]; got {num_steps!r}")


def _ddpm_update(alpha_bar: float, alpha_bar_prev: float, variance_type: str) -> Update:
    """Ancestral step: the posterior q(x_prev | x_t, x0_hat) between the two levels."""
    coef_x0, coef_xt, variance = posterior_coefficients(alpha_bar, alpha_bar_prev, variance_type)
    return Update(coef_x0, coef_xt, math.sqrt(variance))


def _ddim_update(alpha_bar: float, alpha_bar_prev: float, eta: float) -> Update:
    """DDIM eq. 12 with eps re-derived from x0_hat (see the module docstring)."""
    # Eq. 16: sigma is eta times the standard deviation of the DDPM posterior between the levels.
    _, _, posterior_variance = posterior_coefficients(alpha_bar, alpha_bar_prev, "fixed_small")
    sigma = eta * math.sqrt(posterior_variance)
    # max(): near abar_prev = 1 with eta = 1 the difference is tiny and must not round below 0.
    coef_xt = math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0) / (1 - alpha_bar))
    coef_x0 = math.sqrt(alpha_bar_prev) - math.sqrt(alpha_bar) * coef_xt
    return Update(coef_x0, coef_xt, sigma)


def _half_log_snr(alpha_bar: float) -> float:
    """lambda = log(sqrt(abar) / sqrt(1 - abar)) for abar < 1; -infinity at zero terminal SNR."""
    return 0.5 * math.log(alpha_bar / (1 - alpha_bar)) if alpha_bar > 0 else -math.inf


def _second_order(updates: list[Update], alpha_bars: list[float]) -> list[Update]:
    """DPM-Solver++(2M): every step but the first and the last extrapolates x0_hat (c = h / 2 h_last)."""
    lambdas = [_half_log_snr(a) for a in alpha_bars[:-1]]  # the last level, 1, is lambda = infinity
    for i in range(1, len(updates) - 1):
        h, h_last = lambdas[i + 1] - lambdas[i], lambdas[i] - lambdas[i - 1]
        # h_last is infinite after a start at zero terminal SNR: c = 0 there, a first-order step.
        updates[i] = updates[i]._replace(extrapolation=h / (2 * h_last))
    return updates


def _updates(method: str, alpha_bars: list[float], eta: float, variance_type: str) -> list[Update]:
    """One update per step, from alpha_bars[i] to alpha_bars[i + 1] (the last one being 1)."""
    if method == "ddpm":
        update = partial(_ddpm_update, variance_type=variance_type)
    else:  # DPM-Solver++'s first-order step is DDIM with eta = 0 (see the module docstring)
        update = partial(_ddim_update, eta=eta if method == "ddim" else 0.0)
    updates = [update(a, a_prev) for a, a_prev in zip(alpha_bars, alpha_bars[1:])]
    if method == "dpmpp_2m":
        updates = _second_order(updates, alpha_bars)
    # DDPM Algorithm 2 (z = 0 at t = 1): the step onto clean data adds no noise. Only "fixed_large"
    # needs this; the other variances already vanish there.
    updates[-1] = updates[-1]._replace(sigma=0.0)
    return updates


class Churn(NamedTuple):
    """EDM Algorithm 2's S_churn, S_tmin, S_tmax and S_noise; the defaults add no noise (Algorithm 1)."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def gamma(self, sigma: float, num_steps: int) -> float:
        """Algorithm 2 line 4: gamma_i = min(S_churn / N, sqrt(2) - 1) for t_i in [S_tmin, S_tmax]."""
        if not self.s_tmin <= sigma <= self.s_tmax:
            return 0.0
        return min(self.s_churn / num_steps, math.sqrt(2) - 1)


def edm_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> list[float]:
    """EDM eq. 5: sigma_i = (sigma_max^(1/rho) + i / (N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    for i = 0 .. N-1 (descending, without the final sigma_N = 0); [sigma_max] for N = 1."""
    if num_steps == 1:
        return [sigma_max]
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(top + i / (num_steps - 1) * (bottom - top)) ** rho for i in range(num_steps)]


def level_sigmas(scheduler: NoiseScheduler) -> list[float]:
    """sigma_t = sqrt((1 - abar_t) / abar_t) of every trained timestep t = 0 .. T-1 (EDM Table 1, VP)."""
    alpha_bar = scheduler.alpha_bar(torch.arange(scheduler.num_timesteps))
    return ((1 - alpha_bar) / alpha_bar).sqrt().tolist()


def nearest_level(levels: Sequence[float], sigma: float) -> int:
    """The trained timestep whose sigma is nearest to ``sigma`` (EDM's code: ``round_sigma``)."""
    return min(range(len(levels)), key=lambda t: abs(levels[t] - sigma))


def edm_timesteps(scheduler: NoiseScheduler, num_steps: int) -> list[int]:
    """The descending timesteps of "heun" and "edm_stochastic": eq. 5's sigmas, each rounded to the
    nearest trained level (see the module docstring)."""
    _check_num_steps(scheduler.num_timesteps, num_steps)
    levels = level_sigmas(scheduler)
    if math.isinf(levels[-1]):
        raise ValueError("heun and edm_stochastic start at sigma_max, the sigma of t = T-1, which is "
                         "infinite at zero terminal SNR (abar = 0); use ddim or dpmpp_2m")
    return [nearest_level(levels, sigma) for sigma in edm_sigmas(levels[0], levels[-1], num_steps)]


class Levels(NamedTuple):
    """What the EDM samplers need of a model: its sigmas and how its network reads a level."""

    sigmas: list[float]  # the steps' sigmas (eq. 5), descending, without the final sigma = 0
    round_sigma: Callable[[float], float]  # the level the model knows nearest to a sigma
    network_input: Callable[[Tensor, float], tuple[Tensor, int | float]]  # (x, sigma) -> (x_t, t)


def vp_levels(scheduler: NoiseScheduler, num_steps: int) -> Levels:
    """A DDPM model's: its trained levels (edm_timesteps), the input x_vp = x / sqrt(1 + sigma^2)
    at the timestep of that level (Table 1, VP)."""
    levels = level_sigmas(scheduler)
    timestep = {sigma: t for t, sigma in enumerate(levels)}
    return Levels([levels[t] for t in edm_timesteps(scheduler, num_steps)],
                  lambda sigma: levels[nearest_level(levels, sigma)],
                  lambda x, sigma: (x / math.sqrt(1 + sigma**2), timestep[sigma]))


def edm_levels(edm: EDM, num_steps: int) -> Levels:
    """An EDM model's: eq. 5's sigmas in [sigma_min, sigma_max], any sigma, the input c_in x."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")
    return Levels(edm_sigmas(edm.sigma_min, edm.sigma_max, num_steps), lambda sigma: sigma,
                  lambda x, sigma: (x * edm.preconditioning(sigma)[2], edm.timestep(sigma)))


def _x0_hat(model: Callable[..., Tensor], scheduler: NoiseScheduler | EDM, x_t: Tensor,
            t: int | float, x0_last: Tensor, clip_sample: bool, self_condition: bool) -> Tensor:
    """The model's prediction of the clean image at (x_t, t), clipped to [-1, 1] when asked."""
    # A DDPM's timestep is an index (int), an EDM model's a float (pipeline/edm.py).
    dtype = torch.long if isinstance(t, int) else torch.float32
    t_batch = torch.full((x_t.shape[0],), t, dtype=dtype, device=x_t.device)
    output = model(x_t, t_batch, x_self_cond=x0_last) if self_condition else model(x_t, t_batch)
    x0 = scheduler.predict_x0(output, x_t, t)
    return x0.clamp(-1.0, 1.0) if clip_sample else x0


@torch.inference_mode()
def sample(
    model: Callable[..., Tensor],
    scheduler: NoiseScheduler | EDM,
    shape: Sequence[int],
    *,
    method: str = "ddpm",
    num_steps: int | None = None,
    eta: float = 0.0,
    timestep_spacing: str = "leading",
    clip_sample: bool = True,
    variance_type: str = "fixed_small",
    churn: Churn = Churn(),
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    return_intermediates: bool = False,
    progress: bool = False,
    self_condition: bool = False,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Draw samples of ``shape`` (batch first) by running the reverse process from pure noise.

    Args:
        model: ``model(x_t, t)`` with t a long tensor of shape [batch], returning the prediction of
            ``scheduler.prediction_type``; ``model(x_t, t, x_self_cond=x0_hat)`` with
            ``self_condition``.
        scheduler: the forward process the model was trained with: a NoiseScheduler, or an EDM
            formulation (methods "heun" and "edm_stochastic" only).
        shape: shape of the batch of samples, e.g. (n, channels, height, width).
        method: "ddpm" (ancestral), "ddim", "dpmpp_2m" (DPM-Solver++(2M), deterministic), "heun"
            (EDM Algorithm 1, deterministic) or "edm_stochastic" (EDM Algorithm 2).
        num_steps: number of steps S, 1 <= S <= T; None means T (an EDM model has no T and
            needs S). The model is evaluated S times, 2 S - 1 times by "heun" and "edm_stochastic".
        eta: DDIM stochasticity in [0, 1]: 0 is deterministic, 1 is DDPM. Used by "ddim" only.
        timestep_spacing: which S timesteps to visit, see :func:`timesteps`; the EDM samplers
            visit those of :func:`edm_timesteps` instead.
        clip_sample: clip x0_hat to [-1, 1] at every step (data are scaled to [-1, 1]).
        variance_type: "fixed_small" or "fixed_large" reverse variance of "ddpm"; used by "ddpm" only.
        churn: the noise that "edm_stochastic" adds; its s_churn must be 0 for the other methods.
        generator: source of all randomness, the initial noise included; it must live on ``device``.
        device: where to sample.
        return_intermediates: also return x0_hat of every step (S tensors of ``shape``), e.g. for
            a figure of the denoising progression; for the EDM samplers the first of each step's
            two evaluations.
        progress: show a progress bar (plain lines when stderr is not a terminal).
        self_condition: call ``model(x_t, t, x_self_cond=...)`` with the previous evaluation's
            x0_hat (zeros at the first one), for a model trained with self-conditioning.

    Returns:
        The samples, or (samples, list of x0_hat per step) with ``return_intermediates``.
    """
    check_choice("method", method, SamplingMethod)
    check_choice("variance_type", variance_type, VarianceType)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1]; got {eta!r}")
    if churn.s_churn < 0 or churn.s_noise <= 0:
        raise ValueError(f"churn needs s_churn >= 0 and s_noise > 0; got {churn}")
    if churn.s_churn > 0 and method != "edm_stochastic":
        raise ValueError(f"s_churn = {churn.s_churn!r} is used by method 'edm_stochastic' only; "
                         f"method {method!r} would ignore it")
    edm = isinstance(scheduler, EDM)
    if edm and method not in EDM_METHODS:
        raise ValueError(f"method {method!r} walks a DDPM's timesteps; an EDM model has continuous "
                         f"noise levels: use {' or '.join(map(repr, EDM_METHODS))}")
    if num_steps is None:
        if edm:
            raise ValueError("num_steps is needed for an EDM model: it has no timesteps to count")
        num_steps = scheduler.num_timesteps
    x0_hat = partial(_x0_hat, model, scheduler, clip_sample=clip_sample, self_condition=self_condition)
    if method in EDM_METHODS:
        levels = edm_levels(scheduler, num_steps) if edm else vp_levels(scheduler, num_steps)
        steps = levels.sigmas
        run = partial(_edm_steps, x0_hat, levels, churn=churn)
    else:
        steps = timesteps(scheduler.num_timesteps, num_steps, timestep_spacing)
        # Levels as Python floats: the per-step coefficients are then plain float arithmetic.
        alpha_bars = scheduler.alpha_bar(torch.tensor(steps + [-1])).tolist()
        run = partial(_vp_steps, x0_hat, _updates(method, alpha_bars, eta, variance_type))
    x = torch.randn(tuple(shape), generator=generator, device=device)
    states = run(x, steps, generator)
    if progress:
        states = progress_bar(states, len(steps), method)
    predictions = []
    for x, x0 in states:
        if return_intermediates:
            predictions.append(x0)
    return (x, predictions) if return_intermediates else x


def _vp_steps(x0_hat: Callable[..., Tensor], updates: list[Update], x: Tensor, steps: list[int],
              generator: torch.Generator | None) -> Iterator[tuple[Tensor, Tensor]]:
    """DDPM, DDIM and DPM-Solver++(2M) from the noise x: (x, x0_hat) after each step."""
    # Zeros before the first step: Algorithm 2's initial x_pred for self-conditioning; the first
    # step never extrapolates (c = 0), so DPM-Solver++ does not read it.
    x0_last = torch.zeros_like(x)
    for t, (coef_x0, coef_xt, sigma, extrapolation) in zip(steps, updates):
        x0 = x0_hat(x, t, x0_last)
        target = x0 + extrapolation * (x0 - x0_last) if extrapolation else x0
        x = coef_x0 * target + coef_xt * x
        if sigma > 0:  # DDIM with eta = 0 draws nothing: its path depends on the initial noise only
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        x0_last = x0
        yield x, x0


def _edm_steps(x0_hat: Callable[..., Tensor], levels: Levels, noise: Tensor, sigmas: list[float],
               generator: torch.Generator | None, churn: Churn) -> Iterator[tuple[Tensor, Tensor]]:
    """EDM Algorithm 2 (Algorithm 1 without churn) from the noise: (x, D of the step's first
    evaluation) after each step, x in the variance-exploding form (x = x0 + sigma noise)."""
    last = torch.zeros_like(noise)  # the self-conditioning input: the previous evaluation's D

    def denoise(x: Tensor, sigma: float) -> Tensor:
        # D(x; sigma): the model's x0_hat at its own input for x (Levels.network_input).
        nonlocal last
        last = x0_hat(*levels.network_input(x, sigma), last)
        return last

    x = sigmas[0] * noise  # line 2: x_0 ~ N(0, t_0^2 I)
    for i, sigma in enumerate(sigmas):
        sigma_hat = sigma
        gamma = churn.gamma(sigma, len(sigmas))
        if gamma > 0:  # lines 5-6, with t_hat rounded to a level of the model like every sigma
            sigma_hat = levels.round_sigma(sigma * (1 + gamma))
            extra = math.sqrt(sigma_hat**2 - sigma**2) * churn.s_noise
            x = x + extra * torch.randn(x.shape, generator=generator, device=x.device)
        x0 = denoise(x, sigma_hat)
        if i == len(sigmas) - 1:  # line 8 with t_N = 0: x_N = x_hat - t_hat (x_hat - D) / t_hat = D
            yield x0, x0
            return
        sigma_next = sigmas[i + 1]
        slope = (x - x0) / sigma_hat  # line 7: d_i = (x_hat - D(x_hat; t_hat)) / t_hat
        x_next = x + (sigma_next - sigma_hat) * slope  # line 8, the Euler step
        slope_next = (x_next - denoise(x_next, sigma_next)) / sigma_next  # line 10
        x = x + (sigma_next - sigma_hat) * (slope + slope_next) / 2  # line 11, Heun's correction
        yield x, x0


def drop_labels(labels: Tensor, null_label: int, prob: float, generator: torch.Generator | None = None
                ) -> Tensor:
    """Classifier-free guidance training (Ho & Salimans 2022, Algorithm 1): each label becomes
    ``null_label`` with probability ``prob``, so one network learns eps(x, c) and eps(x, null)."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < prob
    return labels.masked_fill(drop, null_label)


def model_fn(model: Callable[..., Tensor], labels: Tensor | None) -> Callable[..., Tensor]:
    """The ``model(x_t, t)`` for :func:`sample` of a network ``model(x, t, labels)``, with fixed
    class labels (None: unconditional); ``extra`` passes on the sampler's ``x_self_cond=``."""
    return lambda x, t, **extra: model(x, t, labels, **extra)


def guided(model: Callable[..., Tensor], labels: Tensor, null_label: int,
           scale: float) -> Callable[..., Tensor]:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): the ``model(x_t, t)`` for :func:`sample`.

    The guided prediction is

        eps_guided = (1 + w) eps(x_t, c) - w eps(x_t, null),    w = ``scale`` >= 0,

    where w = 0 is the conditional model itself and a larger w trades diversity for samples that
    look more like their class. ``model(x, t, labels)`` is a class-conditional network and
    ``null_label`` its "no class" label. Both predictions come from one forward pass over the batch
    taken twice. The weights (1 + w, -w) sum to 1 and x0 and v are affine in eps at fixed x_t, so
    combining x0 or v predictions the same way is the same guidance for every prediction type.
    With self-conditioning, both halves see the same x0 estimate ``x_self_cond``: the previous
    step's guided one, the x0_hat that :func:`sample` computes.
    """

    def guided_model(x: Tensor, t: Tensor, x_self_cond: Tensor | None = None) -> Tensor:
        null = torch.full_like(labels, null_label)
        # Passed on only when given, so a model without self-conditioning keeps model(x, t, labels).
        extra = {} if x_self_cond is None else {"x_self_cond": torch.cat([x_self_cond] * 2)}
        conditional, unconditional = model(torch.cat([x, x]), torch.cat([t, t]),
                                           torch.cat([labels, null]), **extra).chunk(2)
        return (1 + scale) * conditional - scale * unconditional

    return guided_model
