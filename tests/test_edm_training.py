"""EDM's training formulation (pipeline/edm.py, Karras et al. 2022): preconditioning, noise levels,
loss, its params, training with exact resume, and sampling an EDM-trained model."""

import math

import pytest
import torch

from pipeline import generate as generate_cli
from pipeline.config import ParamsError, from_dict, sample_params
from pipeline.data import ImageSet
from pipeline.edm import EDM
from pipeline.inference import generate
from pipeline.model_file import EMA_FILE, load_ema_model
from pipeline.model_request import example_request, request_params
from pipeline.noise_scheduler import NoiseScheduler
from pipeline.sampler import Churn, sample
from pipeline.training import train
from test_sampler import X_STAR
from test_training import TINY, Recorder, assert_same_weights, ema_weights, tiny_data

SIGMA_DATA = 0.5


def edm_params(**sections):
    raw = {section: dict(values) for section, values in TINY.items()}
    raw["diffusion"] = {"formulation": "edm"}
    raw["sample"] = {"method": "heun", "num_steps": 3}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw)


def test_preconditioning_by_hand():
    # sigma = 1.2 with sigma_data = 0.5: sigma^2 + sigma_data^2 = 1.69 = 1.3^2 (Table 1).
    c_skip, c_out, c_in, c_noise = EDM(SIGMA_DATA).preconditioning(1.2)
    assert c_skip == pytest.approx(0.25 / 1.69, rel=1e-12)
    assert c_out == pytest.approx(0.6 / 1.3, rel=1e-12)
    assert c_in == pytest.approx(1 / 1.3, rel=1e-12)
    assert c_noise == pytest.approx(0.25 * math.log(1.2), rel=1e-12)
    # At sigma = sigma_data the skip and the network share the output equally.
    c_skip, c_out, c_in, c_noise = EDM(SIGMA_DATA).preconditioning(SIGMA_DATA)
    assert (c_skip, c_out, c_in) == pytest.approx((0.5, SIGMA_DATA / math.sqrt(2), 1 / (SIGMA_DATA * math.sqrt(2))))
    # Tensors give the same numbers as floats.
    sigma = torch.tensor([0.002, 0.3, 1.2, 80.0], dtype=torch.float64)
    for tensor, floats in zip(EDM(SIGMA_DATA).preconditioning(sigma),
                              zip(*[EDM(SIGMA_DATA).preconditioning(s) for s in sigma.tolist()])):
        torch.testing.assert_close(tensor, torch.tensor(floats, dtype=torch.float64))


@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.5, 2.0, 80.0])
def test_unit_variance_of_the_network_input_and_target(sigma):
    """Appendix B.6: for data of standard deviation sigma_data, c_in x and the effective target
    (y - c_skip x) / c_out both have unit variance, in closed form and in a draw."""
    c_skip, c_out, c_in, _ = EDM(SIGMA_DATA).preconditioning(sigma)
    assert c_in**2 * (SIGMA_DATA**2 + sigma**2) == pytest.approx(1)
    assert ((1 - c_skip) ** 2 * SIGMA_DATA**2 + c_skip**2 * sigma**2) / c_out**2 == pytest.approx(1)
    edm, n = EDM(SIGMA_DATA), 200_000
    generator = torch.Generator().manual_seed(0)
    y = SIGMA_DATA * torch.randn(n, 1, 1, 1, generator=generator, dtype=torch.float64)
    noise = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    t = torch.full((n,), edm.timestep(sigma), dtype=torch.float64)
    tolerance = 5 * math.sqrt(2 / n)  # the standard error of a variance estimate, 5 times
    assert edm.add_noise(y, noise, t).var().item() == pytest.approx(1, abs=tolerance)
    assert edm.get_target(y, noise, t).var().item() == pytest.approx(1, abs=tolerance)


def test_the_weight_makes_the_preconditioned_loss_unweighted():
    """Eq. 8: lambda(sigma) c_out(sigma)^2 = 1, so lambda ||D - y||^2 = ||F - target||^2 for any F."""
    edm = EDM(SIGMA_DATA)
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    c_out = edm.preconditioning(sigma)[1]
    torch.testing.assert_close(edm.loss_weight(sigma) * c_out**2, torch.ones_like(sigma))
    generator = torch.Generator().manual_seed(1)
    y, noise, output = (torch.randn(50, 1, 4, 4, generator=generator, dtype=torch.float64)
                        for _ in range(3))
    t = edm.timestep(sigma)
    x_t = edm.add_noise(y, noise, t)
    denoised = edm.predict_x0(output, x_t, t)
    weighted = edm.loss_weight(sigma) * ((denoised - y) ** 2).flatten(1).mean(1)
    effective = ((output - edm.get_target(y, noise, t)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(weighted, effective)
    # The network input is c_in (y + sigma noise), and D inverts the target: F = target gives y.
    torch.testing.assert_close(x_t, (y + sigma.view(-1, 1, 1, 1) * noise)
                               / (sigma.view(-1, 1, 1, 1) ** 2 + SIGMA_DATA**2).sqrt())


def test_log_normal_noise_levels():
    """ln(sigma) ~ N(P_mean, P_std^2): mean, standard deviation and the mass within one standard
    deviation, each within 5 standard errors of a 100,000-draw estimate."""
    edm, n = EDM(p_mean=-1.2, p_std=1.2), 100_000
    t = edm.draw_timesteps(n, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (n,)
    log_sigma = edm.sigma(t.double()).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=5 * 1.2 / math.sqrt(n))
    assert log_sigma.std().item() == pytest.approx(1.2, abs=5 * 1.2 / math.sqrt(2 * n))
    inside = ((log_sigma + 1.2).abs() < 1.2).double().mean().item()
    one_sigma = math.erf(1 / math.sqrt(2))  # 0.6827
    assert inside == pytest.approx(one_sigma, abs=5 * math.sqrt(one_sigma * (1 - one_sigma) / n))
    # The time input is 250 ln(sigma) = 1000 c_noise.
    torch.testing.assert_close(t.double(), 250 * log_sigma, rtol=1e-6, atol=1e-4)


def test_ddpm_draws_the_timesteps_it_always_drew():
    """train_step draws through the scheduler now: for DDPM the draws of torch.randint(T) before."""
    drawn = NoiseScheduler(50).draw_timesteps(1000, torch.Generator().manual_seed(4))
    assert torch.equal(drawn, torch.randint(50, (1000,), generator=torch.Generator().manual_seed(4)))


def oracle_network(y_of, sigma_data=SIGMA_DATA):
    """The F(c_in x; t) that makes D(x; sigma) = y_of(x, sigma) exactly: computed here from eq. 7
    and Table 1 in float64, apart from pipeline/edm.py (sigma = e^(t / 250), x = x_t / c_in)."""

    def network(x_t, t, x_self_cond=None):
        sigma = (t.double() / 250).exp().view(-1, *[1] * (x_t.ndim - 1))
        total = sigma**2 + sigma_data**2
        x = x_t.double() * total.sqrt()
        output = (y_of(x, sigma) - sigma_data**2 / total * x) / (sigma * sigma_data / total.sqrt())
        return output.to(x_t.dtype)

    return network


def gaussian_denoiser(std):
    """The ideal denoiser of data N(0, std^2 I): D(x; sigma) = std^2 / (std^2 + sigma^2) x."""
    return lambda x, sigma: std**2 / (std**2 + sigma**2) * x


@pytest.mark.parametrize("sigma", [0.01, 0.4, 3.0, 60.0])
def test_the_ideal_denoiser_is_the_loss_minimum(sigma):
    """At one sigma, for the one-image data set (loss 0) and a Gaussian one (loss lambda times
    the posterior variance, Table 1's irreducible error), the loss of the ideal F has its closed
    form and zero gradient in the scale a of D = a x; its gradient away from it does not."""
    edm, n = EDM(SIGMA_DATA), 100_000
    generator = torch.Generator().manual_seed(2)
    t = torch.full((n,), edm.timestep(sigma), dtype=torch.float64)
    image = X_STAR.double().view(1, *X_STAR.shape)
    noise = torch.randn((n, *X_STAR.shape), generator=generator, dtype=torch.float64)
    x_t = edm.add_noise(image.expand_as(noise), noise, t)
    one_image = oracle_network(lambda x, s: image)(x_t, t)
    assert (one_image - edm.get_target(image.expand_as(noise), noise, t)).abs().max() < 1e-9
    torch.testing.assert_close(edm.predict_x0(one_image, x_t, t), image.expand_as(noise))

    std = 0.8  # not sigma_data, so that the ideal F is not zero
    y = std * torch.randn(n, 1, 1, 1, generator=generator, dtype=torch.float64)
    noise = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    x_t, target = edm.add_noise(y, noise, t), edm.get_target(y, noise, t)
    best = std**2 / (std**2 + sigma**2)

    def loss_and_gradient(scale):
        scale = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
        output = oracle_network(lambda x, s: scale * x)(x_t, t)
        losses = ((output - target) ** 2).flatten(1).mean(1)
        losses.mean().backward()
        return losses, scale.grad.item()

    losses, gradient = loss_and_gradient(best)
    irreducible = edm.loss_weight(sigma) * std**2 * sigma**2 / (std**2 + sigma**2)
    assert losses.mean().item() == pytest.approx(irreducible, rel=5 * math.sqrt(2 / n))
    # The gradient's standard error, from the per-sample gradients 2 (F - target) dF/da.
    per_sample = 2 * (oracle_network(lambda x, s: best * x)(x_t, t) - target) * x_t.double() \
        * (sigma**2 + SIGMA_DATA**2) ** 0.5 / edm.preconditioning(sigma)[1]
    error = 5 * per_sample.std().item() / math.sqrt(n)
    assert abs(gradient) < error
    # Away from it by delta the mean gradient is 2 lambda delta (std^2 + sigma^2), over 100 errors.
    delta = 0.5 * std / math.sqrt(std**2 + sigma**2)
    assert loss_and_gradient(best - delta)[1] < -error and loss_and_gradient(best + delta)[1] > error


def test_for_data_of_std_sigma_data_the_zero_network_is_ideal():
    """With std = sigma_data the ideal D is c_skip x: F = 0 (the UNet's zero-initialised output)
    is the ideal denoiser, and its loss is the target's unit variance at every sigma."""
    edm, n = EDM(SIGMA_DATA), 100_000
    generator = torch.Generator().manual_seed(3)
    for sigma in [0.01, 1.0, 50.0]:
        y = SIGMA_DATA * torch.randn(n, 1, 1, 1, generator=generator, dtype=torch.float64)
        noise = torch.randn(y.shape, generator=generator, dtype=torch.float64)
        t = torch.full((n,), edm.timestep(sigma), dtype=torch.float64)
        ideal = oracle_network(gaussian_denoiser(SIGMA_DATA))(edm.add_noise(y, noise, t), t)
        assert ideal.abs().max() < 1e-9
        loss = (edm.get_target(y, noise, t) ** 2).mean().item()
        assert loss == pytest.approx(1, abs=5 * math.sqrt(2 / n))


@pytest.mark.parametrize(("method", "churn"), [("heun", Churn()),
                                               ("edm_stochastic", Churn(s_churn=10.0, s_tmax=10.0))])
def test_the_samplers_with_a_one_image_oracle_draw_the_image(method, churn):
    edm = EDM(SIGMA_DATA)
    samples = sample(oracle_network(lambda x, s: X_STAR.double()), edm, (64, *X_STAR.shape),
                     method=method, num_steps=12, churn=churn,
                     generator=torch.Generator().manual_seed(0), clip_sample=False)
    torch.testing.assert_close(samples, X_STAR.expand_as(samples), rtol=0, atol=1e-5)


def test_heun_with_a_gaussian_oracle_converges_to_the_exact_flow_with_second_order():
    """For data N(0, std^2), the probability-flow ODE scales x by sqrt(std^2 + sigma^2): from
    sigma_max to sigma_min the sample is noise * sigma_max * sqrt(std^2 + sigma_min^2) /
    sqrt(std^2 + sigma_max^2), then D at sigma_min (the last step). Heun's error falls about
    4-fold per doubling of the steps (measured: 6.3% at 16 steps, 1.4% at 32, 0.32% at 64)."""
    edm, std, shape = EDM(SIGMA_DATA), 0.8, (256, 1, 1, 1)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    at_sigma_min = noise * 80 * math.sqrt(std**2 + 0.002**2) / math.sqrt(std**2 + 80**2)
    exact = gaussian_denoiser(std)(at_sigma_min, 0.002)

    def error(num_steps):
        samples = sample(oracle_network(gaussian_denoiser(std)), edm, shape, method="heun",
                         num_steps=num_steps, generator=torch.Generator().manual_seed(0),
                         clip_sample=False)
        return ((samples - exact).abs() / exact.abs()).max().item()

    errors = [error(n) for n in (16, 32, 64)]
    assert errors[0] / errors[1] > 3 and errors[1] / errors[2] > 3 and errors[2] < 0.005


def test_ddpm_only_samplers_refuse_an_edm_model():
    with pytest.raises(ValueError, match="method 'ddim' walks a DDPM's timesteps"):
        sample(oracle_network(lambda x, s: x), EDM(), (1, 1, 2, 2), method="ddim", num_steps=3)
    with pytest.raises(ValueError, match="num_steps is needed"):
        sample(oracle_network(lambda x, s: x), EDM(), (1, 1, 2, 2), method="heun")


@pytest.mark.parametrize(("raw", "key"), [
    ({"diffusion": {"schedule": "cosine"}}, "diffusion.schedule"),
    ({"diffusion": {"prediction_type": "v_prediction"}}, "diffusion.prediction_type"),
    ({"diffusion": {"num_timesteps": 50}}, "diffusion.num_timesteps"),
    ({"train": {"min_snr_gamma": 10.0}}, "train.min_snr_gamma"),
    ({"train": {"offset_noise": 0.1}}, "train.offset_noise"),
    ({"sample": {"timestep_spacing": "leading"}}, "sample.timestep_spacing"),
    ({"sample": {"method": "ddim"}}, "sample.method"),
    ({"sample": {"method": "dpmpp_2m"}}, "sample.method"),
    ({"sample": {"method": "heun", "variance_type": "fixed_large"}}, "sample.variance_type"),
    ({"diffusion": {"sigma_min": 90.0}}, "diffusion.sigma_min"),
])
def test_ddpm_settings_with_edm_name_their_key(raw, key):
    sections = {"diffusion": {"formulation": "edm"}, "sample": {"method": "heun"}}
    for section, values in raw.items():
        sections[section] = {**sections.get(section, {}), **values}
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        from_dict(sections)


@pytest.mark.parametrize("key", ["sigma_data", "sigma_min", "sigma_max", "p_mean", "p_std"])
def test_edm_settings_with_ddpm_name_their_key(key):
    with pytest.raises(ParamsError, match=rf"diffusion\.{key} = 0\.01 is read by diffusion\.formulation 'edm' only"):
        from_dict({"diffusion": {key: 0.01}})


def test_edm_params_allow_more_steps_than_ddpm_timesteps():
    params = from_dict({"diffusion": {"formulation": "edm"},
                        "sample": {"method": "edm_stochastic", "num_steps": 2000, "s_churn": 5.0}})
    assert params.diffusion.formulation == "edm" and params.sample.num_steps == 2000


VARIANTS = {"plain": {},
            "classes, guidance training, self-conditioning": {
                "model": {"num_classes": 2, "self_condition": True},
                "train": {"cond_drop_prob": 0.3}}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_interrupted_edm_training_resumes_exactly(tmp_path, variant):
    """As tests/test_training.py's DDPM test: Ctrl-C at step 4 (last checkpoint at 2), restarted:
    the same weights, bit for bit; the training grids are Heun's."""
    params, data = edm_params(**VARIANTS[variant]), tiny_data()
    clean = Recorder()
    train(params, data, tmp_path / "clean", clean)
    with pytest.raises(KeyboardInterrupt):
        train(params, data, tmp_path / "resumed", Recorder(stop_at=4))
    logger = Recorder()
    train(params, data, tmp_path / "resumed", logger)
    assert [s for s, _ in logger.metrics] == [4, 6]
    assert [m["loss"] for _, m in logger.metrics] == [m["loss"] for _, m in clean.metrics][1:]
    assert_same_weights(ema_weights(tmp_path / "clean"), ema_weights(tmp_path / "resumed"))
    assert clean.images == [("sample_grid", 3, (22, 22)), ("sample_grid", 6, (22, 22))]


def test_edm_training_learns_a_single_image(tmp_path):
    """Fitting one image: the loss falls from the untrained one (F = 0: E[target^2], near 1) to
    a small fraction of it, and Heun draws the image from the trained EMA model."""
    params = edm_params(train={"steps": 150, "lr": 0.005, "log_every": 10, "sample_every": 1000,
                               "checkpoint_every": 1000, "warmup_steps": 5, "ema_decay": 0.9})
    data = ImageSet(torch.full((1, 1, 8, 8), 200, dtype=torch.uint8), torch.zeros(1).long(), ("x",))
    logger = Recorder()
    train(params, data, tmp_path, logger)
    first, last = logger.metrics[0][1]["loss"], logger.metrics[-1][1]["loss"]
    assert first > 0.6 and last < 0.1
    trained = load_ema_model(tmp_path / EMA_FILE, torch.device("cpu"))
    images, _ = generate(trained, sample_params({"method": "heun", "num_steps": 10,
                                                 "num_images": 16}), progress=False)
    assert (images.float() - 200).abs().mean() < 10


@pytest.fixture(scope="module")
def edm_model(tmp_path_factory):
    """A tiny class-conditional EDM model, trained for 6 steps, as the train stage saves it."""
    folder = tmp_path_factory.mktemp("edm")
    params = edm_params(model={"num_classes": 2}, train={"cond_drop_prob": 0.2})
    train(params, tiny_data(), folder, Recorder())
    return folder / EMA_FILE


@pytest.mark.parametrize("options", [{"method": "heun"},
                                     {"method": "edm_stochastic", "s_churn": 5.0},
                                     {"method": "heun", "guidance_scale": 2.0, "classes": ["b"]}])
def test_generate_from_a_saved_edm_model(edm_model, options):
    trained = load_ema_model(edm_model, torch.device("cpu"))
    assert isinstance(trained.scheduler, EDM) and trained.scheduler.sigma_max == 80.0
    p = sample_params({"num_steps": 3, "num_images": 5, "batch_size": 3, **options})
    images, intermediates = generate(trained, p, return_intermediates=True, progress=False)
    assert images.shape == (5, 1, 8, 8) and images.dtype == torch.uint8 and len(intermediates) == 3
    assert torch.equal(images, generate(trained, p, progress=False)[0])  # seeded
    other, _ = generate(trained, sample_params({**options, "num_steps": 3, "num_images": 5,
                                                "seed": 1}), progress=False)
    assert not torch.equal(images, other)


def test_the_generate_cli_and_the_logged_models_example_sample_an_edm_model(edm_model, tmp_path,
                                                                            capsys):
    out = tmp_path / "grid.png"
    generate_cli.main(["--model", str(edm_model), "--method", "heun", "--steps", "4",
                       "--num", "4", "--out", str(out)])
    assert out.is_file() and "4 images with heun, 4 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="method 'ddpm' walks a DDPM's timesteps"):
        generate_cli.main(["--model", str(edm_model), "--num", "2", "--out", str(out)])
    trained = load_ema_model(edm_model, torch.device("cpu"))
    p, num_images = request_params(example_request(trained))
    assert p.method == "heun"
    images, _ = generate(trained, p, num_images=num_images, progress=False)
    assert images.shape == (4, 1, 8, 8)
