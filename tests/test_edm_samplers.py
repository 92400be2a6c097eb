"""Tests of the EDM samplers of pipeline.sampler, "heun" and "edm_stochastic" (Karras et al. 2022,
Algorithms 1 and 2), on VP schedules, with exact (oracle) models whose samples are known."""

import math

import numpy as np
import pytest
import torch

from pipeline.config import sample_params
from pipeline.inference import generate
from pipeline.model_file import TrainedModel
from pipeline.noise_scheduler import NoiseScheduler
from pipeline.sampler import Churn, edm_sigmas, edm_timesteps, level_sigmas, sample
from pipeline.unet import UNet
from test_sampler import X_STAR, gaussian_flow, gaussian_oracle, oracle, stand_in_model

EDM = ("heun", "edm_stochastic")
CHURN = Churn(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.0)  # churns most steps


def test_sigmas_of_eq_5_by_hand():
    # rho = 7, sigma_max = 2^7, sigma_min = 1: the 7th roots 2, 1.5, 1 are evenly spaced.
    assert edm_sigmas(1.0, 128.0, 3) == pytest.approx([128.0, 1.5**7, 1.0], rel=1e-12)
    assert edm_sigmas(0.002, 80.0, 2) == pytest.approx([80.0, 0.002], rel=1e-12)
    assert edm_sigmas(0.002, 80.0, 1) == [80.0]
    # EDM's own setting (sigma 0.002 .. 80, 18 steps), as np.linspace in the rho-th roots.
    expected = np.linspace(80.0 ** (1 / 7), 0.002 ** (1 / 7), 18) ** 7
    np.testing.assert_allclose(edm_sigmas(0.002, 80.0, 18), expected, rtol=1e-12)


def test_timesteps_are_the_levels_nearest_to_eq_5():
    # Computed here from scratch in numpy: the linear DDPM schedule, its sigmas, eq. 5, nearest.
    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    levels = np.sqrt((1 - alpha_bar) / alpha_bar)
    sigmas = np.linspace(levels[-1] ** (1 / 7), levels[0] ** (1 / 7), 18) ** 7
    expected = [int(np.abs(levels - s).argmin()) for s in sigmas]
    scheduler = NoiseScheduler(1000, "linear")
    np.testing.assert_allclose(level_sigmas(scheduler), levels, rtol=1e-9)
    assert edm_timesteps(scheduler, 18) == expected
    assert expected[0] == 999 and expected[-1] == 0 and expected[1] == 967  # sigma 157.4 .. 0.01


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize(("method", "churn"), [("heun", Churn()), ("edm_stochastic", CHURN)])
def test_with_a_one_image_oracle_both_end_at_the_image(method, churn, prediction_type):
    scheduler = NoiseScheduler(1000, "linear", prediction_type=prediction_type)
    seen_noise = []
    samples = sample(oracle(scheduler, X_STAR, seen_noise), scheduler, (512, *X_STAR.shape), method=method,
                     num_steps=12, churn=churn, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples, X_STAR.expand_as(samples), rtol=0, atol=1e-3)
    assert len(seen_noise) == 2 * 12 - 1
    # Every x the sampler evaluates is x_star + sigma * noise with the same noise for Heun (the
    # exact ODE keeps it) and, with churn, a fresh standard normal one (lines 5-6 add just enough).
    for noise in seen_noise:
        if method == "heun":
            torch.testing.assert_close(noise, seen_noise[0], rtol=0, atol=1e-3)
        else:
            count = noise.numel()
            assert abs(noise.mean().item()) < 5 / math.sqrt(count)
            assert abs(noise.std().item() - 1) < 5 / math.sqrt(2 * count)
    if method == "edm_stochastic":  # the churn did act
        assert not torch.allclose(seen_noise[-1], seen_noise[0], atol=0.1)


def gaussian_setup(prediction_type="epsilon", num_timesteps=1000):
    # Betas scaled by 1000 / T: about the abar of the default 1000-step schedule at t T / 1000.
    scale = 1000 / num_timesteps
    scheduler = NoiseScheduler(num_timesteps, "linear", 1e-4 * scale, 0.02 * scale,
                               prediction_type=prediction_type)
    mean = torch.tensor([0.3, -0.5, 0.1, 0.7], dtype=torch.float64)
    std = torch.tensor([1.0, 1.5, 2.0, 0.8], dtype=torch.float64)
    return scheduler, mean, std, gaussian_oracle(scheduler, mean, std)


def test_heun_samples_a_gaussian():
    scheduler, mean, std, model = gaussian_setup()
    count = 20_000
    samples = sample(model, scheduler, (count, 4), method="heun", num_steps=64, clip_sample=False,
                     generator=torch.Generator().manual_seed(0)).double()
    # The samples are E[x0 | x at t = 0], whose std is std^2 sqrt(abar_0) / m_0 (a hair below std).
    alpha_bar = scheduler.alpha_bar(torch.tensor([0])).item()
    end_std = std**2 * alpha_bar**0.5 / (alpha_bar * std**2 + 1 - alpha_bar) ** 0.5
    # Standard errors: std / sqrt(n) for the mean, std / sqrt(2 n) (0.5%) for the std; allow 5.
    # Measured: relative std errors of 0.1 to 0.4% (the discretisation error at 64 steps is ~0.4%).
    assert ((samples.mean(0) - mean).abs() < 5 * std / math.sqrt(count)).all()
    assert ((samples.std(0) / end_std - 1).abs() < 5 / math.sqrt(2 * count) + 0.005).all()


def euler_reference(model, scheduler, noise, steps):
    """Euler's method for dx/dsigma = (x - D) / sigma on the same levels (Algorithm 1 without
    lines 9-11), written out in float64, x = x_vp / sqrt(abar)."""
    alpha_bars = scheduler.alpha_bar(torch.tensor(steps)).tolist()
    sigmas = [math.sqrt((1 - a) / a) for a in alpha_bars] + [0.0]
    x = sigmas[0] * noise.double()
    for i, t in enumerate(steps):
        x_vp = math.sqrt(alpha_bars[i]) * x
        output = model(x_vp.float(), torch.full((x.shape[0],), t, dtype=torch.long)).double()
        d = (x - scheduler.predict_x0(output, x_vp, t)) / sigmas[i]
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_heun_converges_with_second_order_and_euler_with_first(prediction_type):
    # T = 10^4 levels (the default schedule, finer): dense enough that rounding eq. 5 to them hardly changes the step sizes.
    scheduler, mean, std, model = gaussian_setup(prediction_type, num_timesteps=10_000)
    shape = (256, 4)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    start, end = scheduler.alpha_bar(torch.tensor([9_999, 0])).tolist()
    # x_vp at the start is sqrt(abar) sigma_max noise = sqrt(1 - abar) noise (line 2).
    exact = gaussian_flow(mean, std, math.sqrt(1 - start) * noise.double(), start, end)

    def heun_error(num_steps):
        samples = sample(model, scheduler, shape, method="heun", num_steps=num_steps, clip_sample=False,
                         generator=torch.Generator().manual_seed(0))
        return (samples - exact).abs().max().item()

    def euler_error(num_steps):
        return (euler_reference(model, scheduler, noise, edm_timesteps(scheduler, num_steps)) - exact
                ).abs().max().item()

    # Each doubling of the intervals (S - 1 = 8, 16, 32, 64) halves the steps of eq. 5.
    steps = (9, 17, 33, 65)
    heun, euler = [heun_error(s) for s in steps], [euler_error(s) for s in steps]
    # Measured: Heun 1.57, 0.346, 0.081, 0.0198 (ratios 4.54, 4.25, 4.12); Euler 1.86, 1.01, 0.525,
    # 0.268 (ratios 1.85, 1.92, 1.96): halving the step divides the error by 2^order.
    for coarse, fine in zip(heun, heun[1:]):
        assert coarse / fine == pytest.approx(4, abs=0.8)
    for coarse, fine in zip(euler, euler[1:]):
        assert coarse / fine == pytest.approx(2, abs=0.3)
    assert heun[-1] < euler[-1] / 10


def draw(method, churn=Churn(), seed=0, **kwargs):
    return sample(stand_in_model, NoiseScheduler(1000, "linear"), (3, 1, 4, 4), method=method, num_steps=10,
                  churn=churn, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_without_churn_the_stochastic_sampler_is_heun():
    assert torch.equal(draw("edm_stochastic", Churn(s_tmin=0.5, s_noise=1.007)), draw("heun"))
    assert not torch.allclose(draw("edm_stochastic", CHURN), draw("heun"))


@pytest.mark.parametrize(("method", "churn"), [("heun", Churn()), ("edm_stochastic", CHURN)])
def test_same_seed_same_samples(method, churn):
    assert torch.equal(draw(method, churn), draw(method, churn))
    assert not torch.allclose(draw(method, churn), draw(method, churn, seed=1))


@pytest.mark.parametrize(("method", "churn", "draws_noise"),
                         [("heun", Churn(), False), ("edm_stochastic", Churn(), False),
                          ("edm_stochastic", CHURN, True)])
def test_randomness_beyond_the_initial_noise_is_the_churn(method, churn, draws_noise):
    generator = torch.Generator().manual_seed(0)
    sample(stand_in_model, NoiseScheduler(1000), (3, 1, 4, 4), method=method, num_steps=10, churn=churn,
           generator=generator)
    reference = torch.Generator().manual_seed(0)
    torch.randn((3, 1, 4, 4), generator=reference)  # the initial noise
    assert torch.equal(generator.get_state(), reference.get_state()) != draws_noise


@pytest.mark.parametrize("method", EDM)
@pytest.mark.parametrize("num_steps", [1, 2, 5, 18])
def test_evaluations_self_conditioning_and_intermediates(method, num_steps):
    # A spy: the model counts its calls and checks that each gets the previous call's x0_hat
    # (with prediction_type "sample" and no clipping, x0_hat is the output itself), zeros first.
    scheduler = NoiseScheduler(1000, "linear", prediction_type="sample")
    outputs = []

    def model(x_t, t, x_self_cond):
        expected = outputs[-1] if outputs else torch.zeros_like(x_t)
        assert torch.equal(x_self_cond, expected)
        outputs.append(torch.tanh(x_t) * t.view(-1, 1, 1, 1) / 1000)
        return outputs[-1]

    samples, predictions = sample(model, scheduler, (2, 1, 3, 3), method=method, num_steps=num_steps,
                                  churn=CHURN if method == "edm_stochastic" else Churn(), clip_sample=False,
                                  self_condition=True, return_intermediates=True, progress=True,
                                  generator=torch.Generator().manual_seed(0))
    assert len(outputs) == 2 * num_steps - 1  # NFE of Algorithm 1: two per step, one in the last
    assert len(predictions) == num_steps  # the first evaluation of each step
    assert all(torch.equal(p, outputs[2 * i]) for i, p in enumerate(predictions))
    assert torch.equal(samples, predictions[-1])  # the Euler step to sigma = 0 lands on D


@pytest.mark.parametrize("method", EDM)
def test_clip_sample(method):
    scheduler = NoiseScheduler(100, "linear", prediction_type="sample")

    def model(x_t, t):
        return torch.full_like(x_t, 3.0)

    clipped = sample(model, scheduler, (2, 1, 2, 2), method=method, num_steps=5)
    unclipped = sample(model, scheduler, (2, 1, 2, 2), method=method, num_steps=5, clip_sample=False)
    assert torch.equal(clipped, torch.ones_like(clipped))
    torch.testing.assert_close(unclipped, torch.full_like(unclipped, 3.0))


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("heun", {"churn": Churn(s_churn=1.0)}, "s_churn = 1.0 is used by method 'edm_stochastic' only"),
        ("ddim", {"churn": Churn(s_churn=1.0)}, "method 'ddim' would ignore it"),
        ("edm_stochastic", {"churn": Churn(s_churn=-1.0)}, "s_churn >= 0"),
        ("edm_stochastic", {"churn": Churn(s_noise=0.0)}, "s_noise > 0"),
        ("heun", {"num_steps": 101}, "num_steps.*101"),
    ],
)
def test_invalid_arguments(method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(stand_in_model, NoiseScheduler(100), (1, 1, 2, 2), method=method, **kwargs)


def test_zero_terminal_snr_has_no_sigma_max():
    scheduler = NoiseScheduler(100, prediction_type="v_prediction", rescale_zero_terminal_snr=True)
    with pytest.raises(ValueError, match="infinite at zero terminal SNR"):
        sample(stand_in_model, scheduler, (1, 1, 2, 2), method="heun", num_steps=5)


@pytest.mark.parametrize(("method", "options"), [("heun", {}), ("edm_stochastic", {"s_churn": 10.0})])
def test_generate_with_an_untrained_unet(method, options):
    # The sample stage's path: SampleParams fields into sample(), a real (tiny, random) UNet.
    torch.manual_seed(0)
    model = UNet(1, 8, base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,), num_heads=2,
                 norm_groups=4).eval()
    trained = TrainedModel(model, NoiseScheduler(50), (), None, 0)
    p = sample_params({"method": method, "num_steps": 4, "num_images": 3, "batch_size": 2, **options})
    images, intermediates = generate(trained, p, return_intermediates=True, progress=False)
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.uint8
    assert len(intermediates) == 4
    again, _ = generate(trained, p, progress=False)
    assert torch.equal(images, again)
