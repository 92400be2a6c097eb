"""Tests of pipeline.noise_scheduler against the papers' formulas, evaluated independently in numpy."""

import math

import numpy as np
import pytest
import torch

from pipeline.noise_scheduler import SCHEDULES, NoiseScheduler, min_snr_weights, offset_noise, posterior_coefficients

BETA_START, BETA_END = 1e-4, 0.02


def reference_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    """The schedules written out from their definitions, in float64."""
    i = np.arange(num_timesteps, dtype=np.float64)
    ramp = i / (num_timesteps - 1)  # 0 .. 1
    if schedule == "linear":
        return BETA_START + (BETA_END - BETA_START) * ramp
    if schedule == "scaled_linear":
        return (math.sqrt(BETA_START) + (math.sqrt(BETA_END) - math.sqrt(BETA_START)) * ramp) ** 2
    if schedule == "sigmoid":
        return BETA_START + (BETA_END - BETA_START) / (1 + np.exp(-(12 * ramp - 6)))
    if schedule == "exponential":
        return BETA_START * (BETA_END / BETA_START) ** ramp
    assert schedule == "cosine"

    def f(u):
        return np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.minimum(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), 0.999)


def reference_alpha_bar(schedule: str, num_timesteps: int) -> np.ndarray:
    return np.cumprod(1 - reference_betas(schedule, num_timesteps))


@pytest.mark.parametrize("num_timesteps", [1000, 10])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_matches_definition(schedule, num_timesteps):
    scheduler = NoiseScheduler(num_timesteps, schedule)
    betas = reference_betas(schedule, num_timesteps)
    alpha_bar = reference_alpha_bar(schedule, num_timesteps)

    for attribute in (scheduler.betas, scheduler.alphas, scheduler.alphas_cumprod):
        assert attribute.dtype == torch.float32 and attribute.shape == (num_timesteps,)
    # float32 storage: relative error ~6e-8.
    np.testing.assert_allclose(scheduler.betas.numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(scheduler.alphas.numpy(), 1 - betas, rtol=1e-6)
    for t in (0, 1, num_timesteps // 2, num_timesteps - 1):
        assert scheduler.alphas_cumprod[t].item() == pytest.approx(alpha_bar[t], rel=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "exponential"])
@pytest.mark.parametrize("num_timesteps", [1000, 10])
def test_schedules_run_from_beta_start_to_beta_end(schedule, num_timesteps):
    betas = NoiseScheduler(num_timesteps, schedule).betas
    assert betas[0].item() == pytest.approx(BETA_START, rel=1e-6)
    assert betas[-1].item() == pytest.approx(BETA_END, rel=1e-6)


def test_hand_computed_values():
    # DDPM's schedule (T = 1000, no rescaling): the well-known abar_T = 4.0358e-5.
    linear = NoiseScheduler(1000, "linear")
    assert linear.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)
    # T = 10: betas step by (0.02 - 1e-4) / 9; abar_1 = (1 - 1e-4)(1 - 0.0022111...).
    linear10 = NoiseScheduler(10, "linear")
    assert linear10.betas[1].item() == pytest.approx(1e-4 + 0.0199 / 9, rel=1e-6)
    assert linear10.alphas_cumprod[1].item() == pytest.approx(0.9999 * (1 - 1e-4 - 0.0199 / 9), rel=1e-6)
    # sigmoid starts at sigmoid(-6) of the way from beta_start to beta_end.
    sigmoid = NoiseScheduler(1000, "sigmoid")
    assert sigmoid.betas[0].item() == pytest.approx(1e-4 + 0.0199 / (1 + math.exp(6)), rel=1e-6)
    # scaled_linear T = 10, middle: ((0.01 + 4 * (sqrt(0.02) - 0.01) / 9)) ** 2.
    scaled = NoiseScheduler(10, "scaled_linear")
    assert scaled.betas[4].item() == pytest.approx((0.01 + 4 * (math.sqrt(0.02) - 0.01) / 9) ** 2, rel=1e-6)


@pytest.mark.parametrize("num_timesteps", [1000, 10])
def test_cosine_follows_eq_17_and_caps_beta(num_timesteps):
    scheduler = NoiseScheduler(num_timesteps, "cosine")
    assert scheduler.betas.max().item() <= 0.999 + 1e-7
    assert scheduler.betas[-1].item() == pytest.approx(0.999, rel=1e-6)  # the cap is hit at t = T

    # Away from the capped end abar is eq. 17 itself: f(t / T) / f(0), with DDPM step t = index + 1.
    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in range(0, num_timesteps - 1, max(1, num_timesteps // 7)):
        expected = f((t + 1) / num_timesteps) / f(0)
        assert scheduler.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("num_timesteps", [1000, 10])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_zero_terminal_snr_rescaling(schedule, num_timesteps):
    scheduler = NoiseScheduler(
        num_timesteps, schedule, prediction_type="v_prediction", rescale_zero_terminal_snr=True
    )
    old = np.sqrt(reference_alpha_bar(schedule, num_timesteps))
    # Lin et al. Algorithm 1: sqrt(abar) -> (sqrt(abar) - last) * first / (first - last).
    expected = (old - old[-1]) * old[0] / (old[0] - old[-1])

    assert scheduler.alphas_cumprod[-1].item() == 0.0
    assert scheduler.alphas_cumprod[0].item() == pytest.approx(old[0] ** 2, rel=1e-6)
    np.testing.assert_allclose(scheduler.alphas_cumprod.sqrt().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert scheduler.betas[-1].item() == 1.0


def test_add_noise_statistics():
    scheduler = NoiseScheduler(1000, "linear")
    t = torch.tensor([0, 300, 999])
    alpha_bar = reference_alpha_bar("linear", 1000)[t.numpy()]
    generator = torch.Generator().manual_seed(0)
    num_pixels = 40_000
    noise = torch.randn(3, 1, 200, 200, generator=generator)

    x_t = scheduler.add_noise(torch.zeros_like(noise), noise, t)
    # Std of n = 40k standard normals times s has relative standard error 1 / sqrt(2 n) = 0.35%:
    # allow 5 standard errors.
    tolerance = 5 / math.sqrt(2 * num_pixels)
    for i in range(3):
        assert x_t[i].std().item() == pytest.approx(math.sqrt(1 - alpha_bar[i]), rel=tolerance)

    x0 = torch.rand(3, 1, 4, 4, generator=generator) * 2 - 1
    mean = scheduler.add_noise(x0, torch.zeros_like(x0), t)
    expected = torch.from_numpy(np.sqrt(alpha_bar)).float().view(3, 1, 1, 1) * x0
    torch.testing.assert_close(mean, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_target_and_conversions_round_trip(prediction_type, schedule):
    scheduler = NoiseScheduler(1000, schedule, prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(1)
    edges = torch.tensor([0, 1, 2, 500, 997, 998, 999])
    t = torch.cat([edges, torch.randint(0, 1000, (9,), generator=generator)])
    x0 = torch.rand(len(t), 3, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    x_t = scheduler.add_noise(x0, noise, t)

    target = scheduler.get_target(x0, noise, t)
    alpha_bar = torch.from_numpy(reference_alpha_bar(schedule, 1000)[t.numpy()]).float().view(-1, 1, 1, 1)
    expected_target = {
        "epsilon": noise,
        "sample": x0,
        "v_prediction": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0,  # Salimans & Ho 2022
    }[prediction_type]
    torch.testing.assert_close(target, expected_target, rtol=1e-5, atol=1e-5)
    # Dividing by sqrt(abar) ~ 6e-3 (t near T) or sqrt(1 - abar) ~ 1e-2 (t near 0) amplifies
    # float32 rounding by ~100: 1e-3 is still far below the O(1) values.
    torch.testing.assert_close(scheduler.predict_x0(target, x_t, t), x0, rtol=0, atol=1e-3)
    torch.testing.assert_close(scheduler.predict_noise(target, x_t, t), noise, rtol=0, atol=1e-3)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_conversions_at_zero_terminal_snr(prediction_type):
    scheduler = NoiseScheduler(1000, prediction_type=prediction_type, rescale_zero_terminal_snr=True)
    generator = torch.Generator().manual_seed(2)
    t = torch.tensor([999, 999, 0, 500])
    x0 = torch.rand(4, 1, 4, 4, generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    x_t = scheduler.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t[:2], noise[:2])  # abar = 0: pure noise

    target = scheduler.get_target(x0, noise, t)
    if prediction_type == "v_prediction":
        torch.testing.assert_close(target[:2], -x0[:2])  # v = -x0 where abar = 0
    torch.testing.assert_close(scheduler.predict_x0(target, x_t, t), x0, rtol=0, atol=1e-4)
    torch.testing.assert_close(scheduler.predict_noise(target, x_t, t), noise, rtol=0, atol=1e-4)


def test_snr():
    scheduler = NoiseScheduler(1000, "linear")
    alpha_bar = reference_alpha_bar("linear", 1000)
    t = torch.tensor([0, 10, 999])
    expected = alpha_bar[t.numpy()] / (1 - alpha_bar[t.numpy()])
    np.testing.assert_allclose(scheduler.snr(t).numpy(), expected, rtol=1e-5)
    assert scheduler.snr(torch.tensor([0])).item() == pytest.approx(9999, rel=1e-5)  # 0.9999 / 1e-4


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_posterior_variance(schedule):
    scheduler = NoiseScheduler(1000, schedule)
    betas = reference_betas(schedule, 1000)
    alpha_bar = reference_alpha_bar(schedule, 1000)
    t = torch.arange(1000)

    small = scheduler.posterior_variance(t).numpy()
    assert small[0] == 0.0  # abar_{-1} = 1: x_0 is known exactly given x_1 and x_0
    expected_small = betas[1:] * (1 - alpha_bar[:-1]) / (1 - alpha_bar[1:])  # DDPM eq. 7, beta_tilde
    np.testing.assert_allclose(small[1:], expected_small, rtol=1e-6)
    np.testing.assert_allclose(scheduler.posterior_variance(t, "fixed_large").numpy(), betas, rtol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_mean_coefficients_match_ddpm_eq_7(schedule):
    scheduler = NoiseScheduler(1000, schedule)
    betas = reference_betas(schedule, 1000)
    alpha_bar = reference_alpha_bar(schedule, 1000)
    t = np.array([0, 1, 10, 500, 998, 999])
    alpha_bar_prev = np.where(t > 0, alpha_bar[t - 1], 1.0)

    coef_x0, coef_xt = scheduler.posterior_mean_coefficients(torch.from_numpy(t))
    expected_x0 = np.sqrt(alpha_bar_prev) * betas[t] / (1 - alpha_bar[t])
    expected_xt = np.sqrt(1 - betas[t]) * (1 - alpha_bar_prev) / (1 - alpha_bar[t])
    np.testing.assert_allclose(coef_x0.numpy(), expected_x0, rtol=1e-6)
    np.testing.assert_allclose(coef_xt.numpy(), expected_xt, rtol=1e-6, atol=1e-12)
    assert coef_x0[0].item() == pytest.approx(1.0) and coef_xt[0].item() == pytest.approx(0.0, abs=1e-12)


def bayes_posterior(x0, x_t, alpha_bar, alpha_bar_prev):
    """q(x_prev | x_t, x0) from Bayes' rule: prior q(x_prev | x0), likelihood q(x_t | x_prev)."""
    alpha = alpha_bar / alpha_bar_prev
    precision = 1 / (1 - alpha_bar_prev) + alpha / (1 - alpha)
    weighted = math.sqrt(alpha_bar_prev) * x0 / (1 - alpha_bar_prev) + math.sqrt(alpha) * x_t / (1 - alpha)
    mean = weighted / precision
    return mean, 1 / precision


def test_posterior_mean_is_bayes_posterior():
    scheduler = NoiseScheduler(1000, "linear")
    alpha_bar = reference_alpha_bar("linear", 1000)
    t = torch.tensor([1, 100, 999])
    x0 = torch.tensor([0.5, -0.7, 0.9], dtype=torch.float64).view(3, 1, 1, 1)
    x_t = torch.tensor([0.2, 1.3, -2.0], dtype=torch.float64).view(3, 1, 1, 1)

    mean = scheduler.posterior_mean(x0, x_t, t)
    variance = scheduler.posterior_variance(t)
    for i, step in enumerate(t.tolist()):
        expected_mean, expected_variance = bayes_posterior(
            x0[i].item(), x_t[i].item(), alpha_bar[step], alpha_bar[step - 1]
        )
        assert mean[i].item() == pytest.approx(expected_mean, rel=1e-5)
        assert variance[i].item() == pytest.approx(expected_variance, rel=1e-5)
    torch.testing.assert_close(scheduler.posterior_mean(x0, x_t, torch.zeros(3, dtype=torch.long)), x0)


@pytest.mark.parametrize(("alpha_bar", "alpha_bar_prev"), [(0.05, 0.3), (0.3, 0.9), (0.9, 0.999), (0.0, 0.5)])
def test_posterior_between_arbitrary_levels(alpha_bar, alpha_bar_prev):
    # A respaced chain jumps from abar_t to any abar_prev > abar_t; the posterior is again Bayes'.
    coef_x0, coef_xt, variance = posterior_coefficients(alpha_bar, alpha_bar_prev)
    for x0, x_t in [(1.0, 0.0), (0.0, 1.0), (0.3, -0.8)]:
        expected_mean, expected_variance = bayes_posterior(x0, x_t, alpha_bar, alpha_bar_prev)
        assert coef_x0 * x0 + coef_xt * x_t == pytest.approx(expected_mean, rel=1e-12, abs=1e-12)
        assert variance == pytest.approx(expected_variance, rel=1e-12, abs=1e-12)
    assert posterior_coefficients(alpha_bar, alpha_bar_prev, "fixed_large")[2] == pytest.approx(
        1 - alpha_bar / alpha_bar_prev
    )


def test_posterior_onto_clean_data_is_x0():
    # abar_prev = 1: q(x_prev | x_t, x0) is a point mass at x0.
    assert posterior_coefficients(0.7, 1.0) == pytest.approx((1.0, 0.0, 0.0), abs=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "quadratic"}, "schedule.*'quadratic'"),
        ({"prediction_type": "x0"}, "prediction_type.*'x0'"),
        ({"num_timesteps": 0}, "num_timesteps.*0"),
        ({"num_timesteps": 100.5}, "num_timesteps.*100.5"),
        ({"beta_start": 0.0}, "beta_start=0.0"),
        ({"beta_end": 1.5}, "beta_end=1.5"),
        ({"beta_start": 0.03, "beta_end": 0.02}, "beta_start=0.03"),
        ({"rescale_zero_terminal_snr": True}, "rescale_zero_terminal_snr.*'epsilon'"),
        (
            {"num_timesteps": 1, "prediction_type": "v_prediction", "rescale_zero_terminal_snr": True},
            "num_timesteps >= 2; got 1",
        ),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NoiseScheduler(**kwargs)


def test_invalid_variance_type():
    with pytest.raises(ValueError, match="variance_type.*'learned'"):
        NoiseScheduler().posterior_variance(torch.tensor([5]), "learned")


def test_min_snr_weights_are_the_papers():
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0], dtype=torch.float64)
    gamma = 5.0
    # min(SNR, gamma) = 0, 0.5, 5, 5.
    expected = {
        "epsilon": [1.0, 1.0, 1.0, 0.1],  # min(SNR, gamma) / SNR, 1 in the limit SNR -> 0
        "sample": [0.0, 0.5, 5.0, 5.0],  # min(SNR, gamma)
        "v_prediction": [0.0, 0.5 / 1.5, 5 / 6, 5 / 51],  # min(SNR, gamma) / (SNR + 1)
    }
    for prediction_type, weights in expected.items():
        torch.testing.assert_close(min_snr_weights(snr, gamma, prediction_type),
                                   torch.tensor(weights, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_give_the_same_loss_in_x0_space(prediction_type):
    # The point of the per-target weights: for the same predicted x0, the weighted loss on the
    # model's target equals min(SNR, gamma) times the squared error of x0 (Hang et al. 2023).
    scheduler = NoiseScheduler(1000, "linear", prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 5, 50, 300, 999])
    x0 = (torch.rand(5, 1, 4, 4, generator=generator) * 2 - 1).double()
    noise = torch.randn(x0.shape, generator=generator).double()
    x_t = scheduler.add_noise(x0, noise, t)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=generator).double()
    # The model output that implies x0_hat at x_t: the target of x0_hat and the noise it implies.
    noise_hat = NoiseScheduler(1000, "linear", prediction_type="sample").predict_noise(x0_hat, x_t, t)
    output = scheduler.get_target(x0_hat, noise_hat, t)
    target_error = ((output - scheduler.get_target(x0, noise, t)) ** 2).flatten(1).mean(1)
    x0_error = ((x0_hat - x0) ** 2).flatten(1).mean(1)
    snr = scheduler.snr(t)
    torch.testing.assert_close(min_snr_weights(snr, 5.0, prediction_type) * target_error,
                               snr.clamp(max=5.0) * x0_error, rtol=1e-6, atol=0)


def test_offset_noise():
    noise = torch.randn(2000, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    shifted = offset_noise(noise, 0.5, torch.Generator().manual_seed(5))
    offset = shifted - noise
    # One constant per image and channel: 0.5 times the N(0, 1) draws of the same generator.
    torch.testing.assert_close(offset, offset[:, :, :1, :1].expand_as(offset), rtol=0, atol=1e-6)
    expected = 0.5 * torch.randn(2000, 3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(offset[:, :, 0, 0], expected, rtol=0, atol=1e-6)
    # The offsets have the standard deviation `strength` (relative standard error 1 / sqrt(2 * 6000)).
    assert offset[:, :, 0, 0].std().item() == pytest.approx(0.5, rel=5 / math.sqrt(2 * 6000))
    assert torch.equal(offset_noise(noise, 0.0, torch.Generator()), noise)
