"""Reverse-process samplers for a :class:`~pipeline.noise_scheduler.NoiseScheduler`: DDPM, DDIM and
DPM-Solver++(2M), and classifier-free guidance.

All three walk a descending list of S timesteps (:func:`timesteps`) from pure noise to data. At
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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from pipeline.config import SamplingMethod, TimestepSpacing, VarianceType, check_choice, choices
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
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be an integer in [1, {num_timesteps}]; got {num_steps!r}")
    if spacing == "leading":
        stride = num_timesteps // num_steps
        return [i * stride for i in reversed(range(num_steps))]
    if spacing == "trailing":
        return [round(num_timesteps - i * num_timesteps / num_steps) - 1 for i in range(num_steps)]
    if num_steps == 1:  # linspace(0, T-1, 1) is [0]
        return [0]
    return [round(i * (num_timesteps - 1) / (num_steps - 1)) for i in reversed(range(num_steps))]


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


@torch.inference_mode()
def sample(
    model: Callable[..., Tensor],
    scheduler: NoiseScheduler,
    shape: Sequence[int],
    *,
    method: str = "ddpm",
    num_steps: int | None = None,
    eta: float = 0.0,
    timestep_spacing: str = "leading",
    clip_sample: bool = True,
    variance_type: str = "fixed_small",
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
        scheduler: the forward process the model was trained with.
        shape: shape of the batch of samples, e.g. (n, channels, height, width).
        method: "ddpm" (ancestral), "ddim" or "dpmpp_2m" (DPM-Solver++(2M), deterministic).
        num_steps: number of model evaluations S, 1 <= S <= T; None means T.
        eta: DDIM stochasticity in [0, 1]: 0 is deterministic, 1 is DDPM. Used by "ddim" only.
        timestep_spacing: which S timesteps to visit, see :func:`timesteps`.
        clip_sample: clip x0_hat to [-1, 1] at every step (data are scaled to [-1, 1]).
        variance_type: "fixed_small" or "fixed_large" reverse variance of "ddpm"; used by "ddpm" only.
        generator: source of all randomness, the initial noise included; it must live on ``device``.
        device: where to sample.
        return_intermediates: also return x0_hat of every step (S tensors of ``shape``), e.g. for
            a figure of the denoising progression.
        progress: show a progress bar (plain lines when stderr is not a terminal).
        self_condition: call ``model(x_t, t, x_self_cond=...)`` with the previous step's x0_hat
            (zeros at the first step), for a model trained with self-conditioning.

    Returns:
        The samples, or (samples, list of x0_hat per step) with ``return_intermediates``.
    """
    check_choice("method", method, SamplingMethod)
    check_choice("variance_type", variance_type, VarianceType)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1]; got {eta!r}")
    if num_steps is None:
        num_steps = scheduler.num_timesteps
    steps = timesteps(scheduler.num_timesteps, num_steps, timestep_spacing)
    # Levels as Python floats: the per-step coefficients are then plain float arithmetic.
    alpha_bars = scheduler.alpha_bar(torch.tensor(steps + [-1])).tolist()
    updates = _updates(method, alpha_bars, eta, variance_type)

    x = torch.randn(tuple(shape), generator=generator, device=device)
    predictions = []
    # Zeros before the first step: Algorithm 2's initial x_pred for self-conditioning; the first
    # step never extrapolates (c = 0), so DPM-Solver++ does not read it.
    x0_last = torch.zeros_like(x)
    schedule = zip(steps, updates)
    if progress:
        schedule = progress_bar(schedule, len(steps), method)
    for t, (coef_x0, coef_xt, sigma, extrapolation) in schedule:
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
        output = model(x, t_batch, x_self_cond=x0_last) if self_condition else model(x, t_batch)
        x0 = scheduler.predict_x0(output, x, t)
        if clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
        target = x0 + extrapolation * (x0 - x0_last) if extrapolation else x0
        x = coef_x0 * target + coef_xt * x
        if sigma > 0:  # DDIM with eta = 0 draws nothing: its path depends on the initial noise only
            x = x + sigma * torch.randn(x.shape, generator=generator, device=device)
        x0_last = x0
        if return_intermediates:
            predictions.append(x0)
    return (x, predictions) if return_intermediates else x


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
