"""Tests of pipeline.sampler with exact (oracle) models whose optimal samples are known."""

import math

import pytest
import torch

from pipeline.noise_scheduler import NoiseScheduler
from pipeline.sampler import SPACINGS, drop_labels, guided, sample, timesteps


@pytest.mark.parametrize(
    ("spacing", "first", "last", "small"),
    [
        ("leading", [980, 960, 940, 920], [60, 40, 20, 0], [6, 3, 0]),
        ("trailing", [999, 979, 959, 939], [79, 59, 39, 19], [9, 6, 2]),
        # linspace(0, 999, 50) = 0, 20.39, 40.78, 61.16, ..., 978.61, 999; linspace(0, 9, 3)[1] = 4.5 -> 4.
        ("linspace", [999, 979, 958, 938], [61, 41, 20, 0], [9, 4, 0]),
    ],
)
def test_timesteps(spacing, first, last, small):
    steps = timesteps(1000, 50, spacing)
    assert len(steps) == 50 and steps[:4] == first and steps[-4:] == last
    assert timesteps(10, 3, spacing) == small
    assert timesteps(10, 10, spacing) == list(range(9, -1, -1))


def test_timesteps_with_remainder():
    assert timesteps(10, 4, "leading") == [6, 4, 2, 0]  # stride 10 // 4 = 2
    assert timesteps(10, 4, "trailing") == [9, 7, 4, 1]  # round(10, 7.5, 5, 2.5) - 1, half to even
    assert timesteps(10, 4, "linspace") == [9, 6, 3, 0]


def oracle(scheduler, x_star, seen_noise=None):
    """The exact model for data consisting of the single image x_star.

    Given x_t, x0 = x_star and the noise is (x_t - sqrt(abar) x_star) / sqrt(1 - abar); the model
    returns whichever the scheduler predicts. ``seen_noise`` collects that noise at every call.
    """

    def model(x_t, t):
        alpha_bar = scheduler.alphas_cumprod[t].double().view(-1, *[1] * (x_t.ndim - 1))
        noise = ((x_t - alpha_bar.sqrt() * x_star) / (1 - alpha_bar).sqrt()).float()
        if seen_noise is not None:
            seen_noise.append(noise)
        signal, sigma = alpha_bar.sqrt().float(), (1 - alpha_bar).sqrt().float()
        return {
            "epsilon": noise,
            "sample": x_star.expand_as(x_t),
            "v_prediction": signal * noise - sigma * x_star,
        }[scheduler.prediction_type]

    return model


def stand_in_model(x_t, t):
    """An arbitrary smooth function of (x_t, t) standing in for a network."""
    return torch.tanh(x_t) * (t.view(-1, 1, 1, 1) / 1000)


X_STAR = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
BATCH = 512


def assert_standard_normal(noise):
    # 512 * 16 = 8192 values: standard errors 0.011 (mean) and 0.0078 (std); allow 5.
    count = noise.numel()
    assert abs(noise.mean().item()) < 5 / math.sqrt(count)
    assert abs(noise.std().item() - 1) < 5 / math.sqrt(2 * count)


@pytest.mark.parametrize(
    ("schedule", "num_timesteps", "num_steps", "spacing", "prediction_type"),
    [
        ("cosine", 100, None, "leading", "epsilon"),  # the full chain
        ("linear", 1000, 50, "leading", "epsilon"),
        ("linear", 1000, 50, "trailing", "v_prediction"),
        ("linear", 1000, 50, "linspace", "sample"),
        ("linear", 1000, 7, "trailing", "epsilon"),
    ],
)
def test_ddpm_with_oracle_keeps_marginals_and_ends_at_data(
    schedule, num_timesteps, num_steps, spacing, prediction_type
):
    scheduler = NoiseScheduler(num_timesteps, schedule, prediction_type=prediction_type)
    seen_noise = []
    samples = sample(
        oracle(scheduler, X_STAR, seen_noise), scheduler, (BATCH, *X_STAR.shape), num_steps=num_steps,
        timestep_spacing=spacing, generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(samples, X_STAR.expand_as(samples), rtol=0, atol=1e-3)
    # With x0 known, every x_t the chain visits must be distributed as q(x_t | x0): its implied noise
    # is standard normal. A wrong posterior (mean or variance) of the respaced steps breaks this.
    assert len(seen_noise) == (num_steps or num_timesteps)
    for noise in seen_noise:
        assert_standard_normal(noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_with_oracle_ends_at_data(spacing, eta, prediction_type):
    scheduler = NoiseScheduler(1000, "linear", prediction_type=prediction_type)
    seen_noise = []
    samples = sample(
        oracle(scheduler, X_STAR, seen_noise), scheduler, (BATCH, *X_STAR.shape), method="ddim", num_steps=50,
        eta=eta, timestep_spacing=spacing, generator=torch.Generator().manual_seed(2),
    )
    torch.testing.assert_close(samples, X_STAR.expand_as(samples), rtol=0, atol=1e-3)
    if eta == 0:
        # Deterministic DDIM with the true x0 keeps its initial noise eps at every step:
        # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
        for noise in seen_noise[1:]:
            torch.testing.assert_close(noise, seen_noise[0], rtol=0, atol=1e-3)
    else:
        for noise in seen_noise:
            assert_standard_normal(noise)


def test_ddim_at_zero_terminal_snr():
    scheduler = NoiseScheduler(1000, "linear", prediction_type="v_prediction", rescale_zero_terminal_snr=True)
    samples = sample(
        oracle(scheduler, X_STAR), scheduler, (4, *X_STAR.shape), method="ddim", num_steps=20,
        timestep_spacing="trailing", generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(samples, X_STAR.expand_as(samples), rtol=0, atol=1e-3)


def two_point_model(scheduler, a, b, p):
    """The exact E[noise | x_t] for data x0 = a with probability p, else b."""
    log_prior_odds = math.log(p / (1 - p))

    def model(x_t, t):
        alpha_bar = scheduler.alphas_cumprod[t[0]].item()  # the sampler gives all samples the same t
        signal, variance = math.sqrt(alpha_bar), 1 - alpha_bar
        x = x_t.double()
        # Posterior log-odds of a: log prior odds plus the log ratio of the Gaussian likelihoods
        # N(x_t; sqrt(abar) a, 1 - abar) and N(x_t; sqrt(abar) b, 1 - abar).
        log_odds = log_prior_odds + ((x - signal * b) ** 2 - (x - signal * a) ** 2) / (2 * variance)
        responsibility = torch.sigmoid(log_odds)
        x0_mean = responsibility * a + (1 - responsibility) * b
        return ((x - signal * x0_mean) / math.sqrt(variance)).float()

    return model


def test_ddpm_samples_a_two_point_mixture():
    a, b, p = 0.8, -0.6, 0.3
    scheduler = NoiseScheduler(1000, "linear")
    count = 4000
    samples = sample(
        two_point_model(scheduler, a, b, p), scheduler, (count, 1, 1, 1),
        generator=torch.Generator().manual_seed(4),
    ).flatten()

    near_a = (samples - a).abs() < 1e-3
    near_b = (samples - b).abs() < 1e-3
    assert bool((near_a | near_b).all())
    # Binomial standard error sqrt(p (1 - p) / n) = 0.0072; allow 4.
    assert near_a.float().mean().item() == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / count))


def expected_first_step(method, variance_type, eta, alpha_bar, alpha_bar_prev):
    """(coef_xt, sigma^2) of a step from abar to abar_prev when x0_hat = 0, from the papers."""
    beta = 1 - alpha_bar / alpha_bar_prev  # the respaced step (Nichol & Dhariwal 2021, sec. 4)
    posterior_variance = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)  # DDPM eq. 7
    if method == "ddpm":
        coef_xt = math.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar)  # DDPM eq. 7
        return coef_xt, beta if variance_type == "fixed_large" else posterior_variance
    # DDIM eq. 16, and eq. 12 with x0_hat = 0, i.e. eps_hat = x_t / sqrt(1 - abar).
    variance = eta**2 * (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
    return math.sqrt(1 - alpha_bar_prev - variance) / math.sqrt(1 - alpha_bar), variance


@pytest.mark.parametrize(
    ("method", "variance_type", "eta"),
    [
        ("ddpm", "fixed_small", 0.0),
        ("ddpm", "fixed_large", 0.0),
        ("ddim", "fixed_small", 0.0),
        ("ddim", "fixed_small", 0.5),
        ("ddim", "fixed_small", 1.0),
    ],
)
def test_step_coefficients(method, variance_type, eta):
    # Two steps, 999 -> 499 -> clean, with a model predicting x0_hat = 0: the first step makes
    # x_499 = coef_xt x_999 + sigma z, so regressing x_499 on x_999 measures coef_xt (slope) and
    # sigma^2 (residual variance).
    scheduler = NoiseScheduler(1000, "linear", prediction_type="sample")
    alpha_bar, alpha_bar_prev = scheduler.alphas_cumprod[[999, 499]].double().tolist()
    expected_coef, expected_variance = expected_first_step(
        method, variance_type, eta, alpha_bar, alpha_bar_prev
    )
    inputs = []

    def model(x_t, t):
        inputs.append(x_t.flatten().double())
        return torch.zeros_like(x_t)

    count = 200_000
    samples = sample(
        model, scheduler, (count, 1), method=method, num_steps=2, eta=eta, timestep_spacing="trailing",
        variance_type=variance_type, generator=torch.Generator().manual_seed(5),
    )
    assert torch.equal(samples, torch.zeros_like(samples))  # the last step returns x0_hat, no noise

    x_t, x_prev = inputs[0] - inputs[0].mean(), inputs[1] - inputs[1].mean()
    slope = ((x_t * x_prev).sum() / (x_t**2).sum()).item()
    residual_variance = (x_prev - slope * x_t).var().item()
    # Standard errors for n = 200k: slope sigma / sqrt(n) <= 0.0023, relative one of a variance
    # sqrt(2 / n) = 0.32%; allow 5.
    assert slope == pytest.approx(expected_coef, abs=5 / math.sqrt(count))
    assert residual_variance == pytest.approx(expected_variance, rel=5 * math.sqrt(2 / count), abs=1e-9)


def test_ddim_with_eta_one_is_ddpm():
    scheduler = NoiseScheduler(1000, "linear")

    def draw(method, eta):
        return sample(
            stand_in_model, scheduler, (3, 1, 4, 4), method=method, eta=eta, num_steps=10,
            generator=torch.Generator().manual_seed(0),
        )

    torch.testing.assert_close(draw("ddim", 1.0), draw("ddpm", 0.0), rtol=0, atol=1e-5)


def test_clip_sample():
    scheduler = NoiseScheduler(100, "linear", prediction_type="sample")

    def model(x_t, t):
        return torch.full_like(x_t, 3.0)

    clipped = sample(model, scheduler, (2, 1, 2, 2), num_steps=5)
    unclipped = sample(model, scheduler, (2, 1, 2, 2), num_steps=5, clip_sample=False)
    assert torch.equal(clipped, torch.ones_like(clipped))
    torch.testing.assert_close(unclipped, torch.full_like(unclipped, 3.0))


@pytest.mark.parametrize(("method", "eta"), [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_same_seed_same_samples(method, eta):
    scheduler = NoiseScheduler(1000, "linear")

    def draw(seed):
        return sample(
            stand_in_model, scheduler, (3, 1, 4, 4), method=method, eta=eta, num_steps=10,
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(draw(0), draw(0))
    assert not torch.allclose(draw(0), draw(1))


@pytest.mark.parametrize(("method", "eta", "draws_noise"),
                         [("ddim", 0.0, False), ("ddim", 0.5, True), ("dpmpp_2m", 0.5, False)])
def test_randomness_is_the_initial_noise_only_for_deterministic_samplers(method, eta, draws_noise):
    scheduler = NoiseScheduler(1000, "linear")
    shape = (3, 1, 4, 4)
    generator = torch.Generator().manual_seed(0)
    sample(stand_in_model, scheduler, shape, method=method, eta=eta, num_steps=10, generator=generator)

    reference = torch.Generator().manual_seed(0)
    torch.randn(shape, generator=reference)  # the initial noise
    same_state = torch.equal(generator.get_state(), reference.get_state())
    assert same_state != draws_noise


@pytest.mark.parametrize(
    ("method", "variance_type"),
    [("ddpm", "fixed_small"), ("ddpm", "fixed_large"), ("ddim", "fixed_small"), ("dpmpp_2m", "fixed_small")],
)
def test_return_intermediates(method, variance_type):
    scheduler = NoiseScheduler(1000, "linear")
    shape = (2, 1, 4, 4)
    samples, predictions = sample(
        oracle(scheduler, X_STAR), scheduler, shape, method=method, num_steps=8, variance_type=variance_type,
        generator=torch.Generator().manual_seed(0), return_intermediates=True,
    )
    assert len(predictions) == 8
    for x0 in predictions:
        assert x0.shape == shape
        torch.testing.assert_close(x0, X_STAR.expand(shape), rtol=0, atol=1e-3)
    assert torch.equal(samples, predictions[-1])  # the step onto clean data returns x0_hat


def test_progress_bar(capsys):
    scheduler = NoiseScheduler(100, "linear")
    sample(stand_in_model, scheduler, (1, 1, 2, 2), num_steps=4, progress=True)
    assert "4/4" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "euler"}, "method.*'euler'"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing.*'uniform'"),
        ({"variance_type": "learned"}, "variance_type.*'learned'"),
        ({"method": "ddim", "variance_type": "learned"}, "variance_type.*'learned'"),
        ({"num_steps": 0}, r"num_steps.*\[1, 100\].*0"),
        ({"num_steps": 101}, "num_steps.*101"),
        ({"eta": -0.5}, "eta.*-0.5"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(stand_in_model, NoiseScheduler(100), (1, 1, 2, 2), **kwargs)


# DPM-Solver++(2M)


def gaussian_oracle(scheduler, mean, std):
    """The exact model for data x0 ~ N(mean, std^2) per pixel (mean, std broadcast over the batch).

    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is Gaussian with mean sqrt(abar) mean and variance
    m^2 = abar std^2 + 1 - abar, so E[x0 | x_t] = mean + sqrt(abar) std^2 / m^2 (x_t - sqrt(abar) mean).
    """

    def model(x_t, t):
        alpha_bar = scheduler.alpha_bar(t).view(-1, *[1] * (x_t.ndim - 1))
        signal, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x = x_t.double()
        x0 = mean + signal * std**2 / (alpha_bar * std**2 + 1 - alpha_bar) * (x - signal * mean)
        noise = (x - signal * x0) / sigma
        return {"epsilon": noise, "sample": x0, "v_prediction": signal * noise - sigma * x0}[
            scheduler.prediction_type
        ].float()

    return model


def gaussian_flow(mean, std, x, alpha_bar, alpha_bar_end):
    """E[x0 | x_end] at the exact probability-flow ODE solution x_end from x at level alpha_bar.

    The flow maps the Gaussian marginal at one level onto the one at the other by the increasing
    affine map, i.e. it keeps z = (x - sqrt(abar) mean) / m.
    """
    z = (x.double() - alpha_bar**0.5 * mean) / (alpha_bar * std**2 + 1 - alpha_bar) ** 0.5
    return mean + alpha_bar_end**0.5 * std**2 / (alpha_bar_end * std**2 + 1 - alpha_bar_end) ** 0.5 * z


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_2m_converges_with_second_order_and_ddim_with_first(prediction_type):
    # T - 1 = 1024 and "linspace": each doubling of S halves every step of the same timestep grid.
    # The last sampled timestep is 0 for every S, and the samples are E[x0 | x_0] there (the final
    # step returns x0_hat), so the error is that of the ODE solution from t = 1024 to t = 0.
    scheduler = NoiseScheduler(1025, "linear", prediction_type=prediction_type)
    mean = torch.tensor([0.3, -0.5, 0.1, 0.7], dtype=torch.float64)
    std = torch.tensor([1.0, 1.5, 2.0, 0.8], dtype=torch.float64)
    shape = (256, 4)
    start, end = scheduler.alpha_bar(torch.tensor([1024, 0])).tolist()
    exact = gaussian_flow(mean, std, torch.randn(shape, generator=torch.Generator().manual_seed(0)), start, end)

    def errors(method):
        return [
            (sample(gaussian_oracle(scheduler, mean, std), scheduler, shape, method=method, num_steps=steps,
                    timestep_spacing="linspace", clip_sample=False, generator=torch.Generator().manual_seed(0))
             - exact).abs().max().item()
            for steps in (33, 65, 129, 257)
        ]

    # Measured: DDIM 0.315, 0.159, 0.080, 0.040 (ratios 1.98, 1.99, 1.99); DPM-Solver++(2M) 0.171,
    # 0.044, 0.010, 0.0025 (ratios 3.94, 4.17, 4.18): halving the step divides the error by 2^order.
    ddim, dpmpp = errors("ddim"), errors("dpmpp_2m")
    for coarse, fine in zip(ddim, ddim[1:]):
        assert coarse / fine == pytest.approx(2, abs=0.15)
    for coarse, fine in zip(dpmpp, dpmpp[1:]):
        assert coarse / fine == pytest.approx(4, abs=0.5)
    assert dpmpp[-1] < ddim[-1] / 10


def dpmpp_2m_reference(model, scheduler, x, steps, clip_sample):
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2, written out in float64 from the paper.

    alpha_t = sqrt(abar), sigma_t = sqrt(1 - abar), lambda_t = log(alpha_t / sigma_t); the first
    step is first order, the last one onto clean data (sigma = 0, lambda = infinity) returns x0_hat.
    """
    alpha_bars = scheduler.alpha_bar(torch.tensor(steps)).tolist()
    alphas = [math.sqrt(a) for a in alpha_bars]
    sigmas = [math.sqrt(1 - a) for a in alpha_bars]
    lambdas = [math.log(a / s) if a > 0 else -math.inf for a, s in zip(alphas, sigmas)]
    x = x.double()
    previous = None
    for i, t in enumerate(steps):
        output = model(x.float(), torch.full((x.shape[0],), t, dtype=torch.long)).double()
        x0 = scheduler.predict_x0(output, x, t)
        if clip_sample:
            x0 = x0.clamp(-1, 1)
        if i == len(steps) - 1:
            return x0
        h = lambdas[i + 1] - lambdas[i]
        if previous is None:
            d = x0
        else:
            r = (lambdas[i] - lambdas[i - 1]) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous
        x = sigmas[i + 1] / sigmas[i] * x - alphas[i + 1] * (math.exp(-h) - 1) * d
        previous = x0


@pytest.mark.parametrize(
    ("prediction_type", "spacing", "num_steps", "clip_sample", "zero_snr"),
    [
        ("epsilon", "leading", 12, False, False),
        ("sample", "linspace", 7, True, False),
        ("v_prediction", "trailing", 9, True, True),  # lambda = -infinity at the start
    ],
)
def test_dpmpp_2m_matches_algorithm_2(prediction_type, spacing, num_steps, clip_sample, zero_snr):
    scheduler = NoiseScheduler(1000, "linear", prediction_type=prediction_type, rescale_zero_terminal_snr=zero_snr)
    shape = (3, 1, 4, 4)

    def model(x_t, t):
        return 2 * stand_in_model(x_t, t) + 0.1  # big enough for clip_sample to bite

    samples = sample(model, scheduler, shape, method="dpmpp_2m", num_steps=num_steps, timestep_spacing=spacing,
                     clip_sample=clip_sample, generator=torch.Generator().manual_seed(0))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    expected = dpmpp_2m_reference(model, scheduler, x, timesteps(1000, num_steps, spacing), clip_sample)
    torch.testing.assert_close(samples.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("prediction_type", "num_steps", "scale", "clip_sample", "expected"),
    [
        ("epsilon", 10, 1.0, False,
         [107.1659927368164, -1.940798044204712, -202.2726593017578, 7.805293083190918,
          -47.66240310668945, -87.31915283203125, 3.4774248600006104, 23.46023178100586]),
        ("v_prediction", 6, 3.0, True,
         [0.4078036844730377, -0.05947336554527283, -0.7149917483329773, 0.11715099215507507,
          -0.2550581395626068, -0.3555064797401428, 0.08201497793197632, 0.1847822368144989]),
    ],
)
def test_dpmpp_2m_golden_values_of_diffusers(prediction_type, num_steps, scale, clip_sample, expected):
    # Computed once, outside this project, by diffusers 0.42.1's DPMSolverMultistepScheduler with
    # num_train_timesteps=1000, beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
    # solver_type="midpoint", final_sigmas_type="zero", timestep_spacing="trailing" and, for
    # clipping, thresholding=True with sample_max_value=1.0 (a clamp to [-1, 1]); the same initial
    # noise torch.randn((2, 1, 2, 2), generator=torch.Generator().manual_seed(0)) and model.
    scheduler = NoiseScheduler(1000, "linear", prediction_type=prediction_type)
    samples = sample(
        lambda x_t, t: scale * stand_in_model(x_t, t), scheduler, (2, 1, 2, 2), method="dpmpp_2m",
        num_steps=num_steps, timestep_spacing="trailing", clip_sample=clip_sample,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(samples.flatten(), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_dpmpp_2m_with_one_or_two_steps_is_ddim():
    # No step has both a previous x0_hat and a next one: all steps are first order, i.e. DDIM.
    scheduler = NoiseScheduler(1000, "linear")
    for num_steps in (1, 2):
        draws = [sample(stand_in_model, scheduler, (3, 1, 4, 4), method=method, num_steps=num_steps,
                        generator=torch.Generator().manual_seed(0)) for method in ("ddim", "dpmpp_2m")]
        assert torch.equal(*draws)


# Classifier-free guidance


def labelled_model(calls):
    """A stand-in class-conditional network whose output depends on x, t and the label."""

    def model(x, t, labels):
        calls.append(labels.clone())
        return torch.sin(x * (labels.view(-1, 1, 1, 1) + 1)) + t.view(-1, 1, 1, 1) / 100

    return model


def test_guidance_is_eq_6_in_one_forward_pass():
    calls = []
    model = labelled_model(calls)
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([7, 7, 7, 7])
    labels = torch.tensor([0, 2, 1, 2])
    out = guided(model, labels, null_label=3, scale=2.5)(x, t)

    assert len(calls) == 1 and calls[0].tolist() == [0, 2, 1, 2, 3, 3, 3, 3]  # conditional, then null
    conditional = model(x, t, labels)
    unconditional = model(x, t, torch.full_like(labels, 3))
    torch.testing.assert_close(out, 3.5 * conditional - 2.5 * unconditional, rtol=0, atol=1e-6)


def test_guidance_zero_is_the_conditional_model():
    model = labelled_model([])
    x, t, labels = torch.randn(4, 1, 3, 3), torch.tensor([5, 5, 5, 5]), torch.tensor([0, 1, 2, 0])
    assert torch.equal(guided(model, labels, null_label=3, scale=0.0)(x, t), model(x, t, labels))


def test_guided_sampling_follows_the_guided_prediction():
    # Guidance is a change of model only: sampling the guided model is sampling eq. 6's prediction.
    scheduler = NoiseScheduler(100, "linear")
    model, labels = labelled_model([]), torch.tensor([1, 0])

    def by_hand(x, t):
        return 3 * model(x, t, labels) - 2 * model(x, t, torch.full_like(labels, 3))

    draws = [sample(m, scheduler, (2, 1, 3, 3), method="dpmpp_2m", num_steps=5, generator=torch.Generator().manual_seed(0))
             for m in (guided(model, labels, 3, 2.0), by_hand)]
    torch.testing.assert_close(*draws, rtol=0, atol=1e-5)


def test_drop_labels_rate_and_reproducibility():
    labels = torch.arange(200_000) % 10
    dropped = drop_labels(labels, 10, 0.1, torch.Generator().manual_seed(0))
    is_null = dropped == 10
    assert torch.equal(dropped[~is_null], labels[~is_null])  # the others are kept as they are
    # Binomial standard error sqrt(0.1 * 0.9 / 200k) = 0.00067; allow 5.
    assert is_null.float().mean().item() == pytest.approx(0.1, abs=5 * math.sqrt(0.09 / len(labels)))
    # Independent of the class: each class loses its share too.
    for c in range(10):
        assert is_null[labels == c].float().mean().item() == pytest.approx(0.1, abs=5 * math.sqrt(0.9 / len(labels)))
    assert torch.equal(dropped, drop_labels(labels, 10, 0.1, torch.Generator().manual_seed(0)))
    assert not torch.equal(dropped, drop_labels(labels, 10, 0.1, torch.Generator().manual_seed(1)))
    assert torch.equal(drop_labels(labels, 10, 0.0, torch.Generator()), labels)
