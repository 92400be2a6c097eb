"""Self-conditioning (Chen, Zhang & Hinton 2022, arXiv:2208.04202): the UNet's second input, the
training side (Algorithm 1, train_step), the sampling side (Algorithm 2, sample and guided), the
param, and a self-conditioned model through train, save, load and generate."""

import copy
import hashlib

import pytest
import torch
import torch.nn.functional as F

from bench.models import reference_model
from pipeline.config import ParamsError, TrainParams, from_dict, load_params
from pipeline.inference import denoiser, generate
from pipeline.model_file import EMA_FILE, load_ema_model, read_model_file
from pipeline.noise_scheduler import NoiseScheduler, min_snr_weights, offset_noise
from pipeline.sampler import METHODS, drop_labels, guided, model_fn, sample

# The samplers with one model evaluation per step; EDM's (2 S - 1 evaluations) feed back each
# evaluation's x0_hat, tested in tests/test_edm_samplers.py.
ONE_PER_STEP = ("ddpm", "ddim", "dpmpp_2m")
from pipeline.training import train, train_step
from pipeline.unet import UNet, build_model, count_parameters
from test_training import TINY, Recorder, tiny_data

SIZE = 8
SMALL = dict(base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,), num_heads=2,
             dropout=0.0, norm_groups=4)


def unet(channels: int = 1, self_condition: bool = True, num_classes: int = 0) -> UNet:
    torch.manual_seed(0)
    return UNet(channels, SIZE, **SMALL, num_classes=num_classes, self_condition=self_condition)


def perturbed(model: UNet) -> UNet:
    """Noise on every weight, as if trained: the zero-initialised layers no longer hide the inputs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


# ---------------------------------------------------------------------------------------------
# The UNet


@pytest.mark.parametrize("channels", [1, 3])
def test_first_conv_reads_twice_the_channels_only_when_on(channels):
    on, off = unet(channels, True), unet(channels, False)
    assert (on.conv_in.in_channels, off.conv_in.in_channels) == (2 * channels, channels)
    # The only new weights: one more 3x3 kernel per input channel of conv_in, per output channel.
    assert count_parameters(on) - count_parameters(off) == SMALL["base_channels"] * channels * 9
    x = torch.randn(2, channels, SIZE, SIZE)
    assert perturbed(on)(x, torch.tensor([1, 40]), x_self_cond=x).shape == x.shape


def test_the_default_model_is_bit_identical_to_the_one_before_self_conditioning():
    # Golden values from the code before this option (commit 1b4fdfa): the same modules drawn
    # from the same seed in the same order, and the same forward pass.
    # The unconditional default of then: the class-conditional default of now adds an embedding.
    torch.manual_seed(0)
    model = build_model(from_dict({"model": {"num_classes": 0}}))
    assert not model.self_condition and model.conv_in.in_channels == 1
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.numpy().tobytes())
    assert digest.hexdigest() == "6c8904bcc22950d846642beaf7d43a1f0add6d806cb10bdf840e8a4770ac6ba0"
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    x = torch.randn(2, 1, 28, 28, generator=generator)
    out = model.eval()(x, torch.tensor([10, 900]))
    # Sums over 1568 values: compared to float32 precision, which CPU kernels may vary within.
    assert out.double().sum().item() == pytest.approx(-355.13127995375544, rel=1e-5)
    assert out.double().square().sum().item() == pytest.approx(242.88179255083753, rel=1e-5)
    torch.testing.assert_close(out[1, 0, 14, 10:14], torch.tensor(
        [-0.1311720758676529, -0.4397866427898407, -0.22561372816562653, -0.3418771028518677]))


def test_no_estimate_means_zeros_and_the_estimate_is_the_second_half_of_the_input():
    model = perturbed(unet()).eval()
    x, t = torch.randn(2, 1, SIZE, SIZE), torch.tensor([3, 30])
    estimate = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    assert torch.equal(model(x, t), model(x, t, x_self_cond=torch.zeros_like(x)))
    assert not torch.allclose(model(x, t, x_self_cond=estimate), model(x, t), atol=1e-3)
    with torch.no_grad():
        model.conv_in.weight[:, 1:] = 0  # mute the channels after x_t: the estimate's
    torch.testing.assert_close(model(x, t, x_self_cond=estimate), model(x, t), rtol=0, atol=0)


def test_a_model_without_the_option_refuses_an_estimate():
    x = torch.randn(1, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"x_self_cond given .*self_condition=False"):
        unet(self_condition=False)(x, torch.tensor([5]), x_self_cond=x)


# ---------------------------------------------------------------------------------------------
# Sampling (Algorithm 2)


class EstimateSpy:
    """A plain callable standing in for a self-conditioned network: its output depends on x_t, t
    and the estimate; it records all three and what it returned. The estimate is a required
    keyword, so a sampler that forgets it fails."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, *, x_self_cond):
        out = 2 * torch.sin(3 * x) * (1 + t.view(-1, 1, 1, 1) / 100) + 0.5 * x_self_cond
        self.calls.append((x.clone(), int(t[0]), x_self_cond.clone(), out.clone()))
        return out


def x0_hat(scheduler, output, x, t, clip=True):
    """The sampler's x0_hat of one step, computed here from what the model saw and returned."""
    x0 = scheduler.predict_x0(output, x, t)
    return x0.clamp(-1, 1) if clip else x0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("method", ONE_PER_STEP)
def test_each_step_gets_the_previous_steps_clipped_x0_and_the_first_zeros(method, prediction_type):
    scheduler, spy = NoiseScheduler(100, prediction_type=prediction_type), EstimateSpy()
    samples, predictions = sample(spy, scheduler, (3, 1, 4, 4), method=method, num_steps=6,
                                  generator=torch.Generator().manual_seed(0), self_condition=True,
                                  return_intermediates=True)
    assert len(spy.calls) == 6 and torch.count_nonzero(spy.calls[0][2]) == 0
    unclipped = []
    for (x, t, _, output), (_, _, estimate, _), prediction in zip(spy.calls, spy.calls[1:], predictions):
        assert torch.equal(estimate, x0_hat(scheduler, output, x, t))
        assert torch.equal(estimate, prediction)  # the x0_hat the sampler returns for that step
        unclipped.append(x0_hat(scheduler, output, x, t, clip=False))
    assert max(x0.abs().max() for x0 in unclipped) > 1  # so clipping was there to be checked
    assert torch.equal(samples, predictions[-1]) and samples.abs().max() <= 1


def test_without_clipping_the_estimate_is_the_unclipped_x0():
    scheduler, spy = NoiseScheduler(100), EstimateSpy()
    sample(spy, scheduler, (3, 1, 4, 4), method="ddim", num_steps=5, clip_sample=False,
           self_condition=True)
    for (x, t, _, output), (_, _, estimate, _) in zip(spy.calls, spy.calls[1:]):
        assert torch.equal(estimate, x0_hat(scheduler, output, x, t, clip=False))
    assert max(call[2].abs().max() for call in spy.calls) > 1


@pytest.mark.parametrize("method", ONE_PER_STEP)
def test_guidance_gives_both_halves_the_previous_guided_x0(method):
    scheduler, calls, scale = NoiseScheduler(100), [], 2.0

    def network(x, t, labels, *, x_self_cond):
        out = torch.sin(x * (labels.view(-1, 1, 1, 1) + 1)) * t.view(-1, 1, 1, 1) / 50 + 0.5 * x_self_cond
        calls.append((x[:2].clone(), int(t[0]), x_self_cond.clone(), out.clone()))
        return out

    labels = torch.tensor([1, 0])
    sample(guided(network, labels, 3, scale), scheduler, (2, 1, 4, 4), method=method,
           num_steps=5, generator=torch.Generator().manual_seed(0), self_condition=True)
    assert len(calls) == 5 and torch.count_nonzero(calls[0][2]) == 0
    for (x, t, _, output), (_, _, estimate, _) in zip(calls, calls[1:]):
        conditional, unconditional = output.chunk(2)
        expected = x0_hat(scheduler, (1 + scale) * conditional - scale * unconditional, x, t)
        assert torch.equal(estimate, torch.cat([expected, expected]))


def test_a_model_without_the_option_is_still_called_with_x_and_t_only():
    seen = []
    sample(lambda x, t: seen.append(t) or torch.zeros_like(x), NoiseScheduler(50), (1, 1, 2, 2),
           method="dpmpp_2m", num_steps=3)
    assert len(seen) == 3


# ---------------------------------------------------------------------------------------------
# Training (Algorithm 1)


X0 = torch.rand(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(9)) * 2 - 1


def replay(seed, scheduler, n=len(X0)):
    """The draws of a self-conditioned train_step (no other option) from a generator of `seed`."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(scheduler.num_timesteps, (n,), generator=generator)
    noise = torch.randn(X0.shape, generator=generator)
    coin = torch.rand((), generator=generator).item() < 0.5
    return t, noise, coin, generator


def seed_with_coin(scheduler, heads):
    """The first seed whose step self-conditions (heads) or not."""
    return next(s for s in range(100) if replay(s, scheduler)[2] == heads)


def recorded(model):
    """Every forward call of `model`: (args, kwargs, whether gradients were on)."""
    calls = []
    model.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((args, kwargs, torch.is_grad_enabled())),
        with_kwargs=True)
    return calls


def one_step(model, scheduler, generator, shard=slice(None)):
    """train_step on the rows `shard` of the batch X0, with the plain L_simple loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return train_step(model, scheduler, optimizer, X0[shard], None, generator,
                      TrainParams(grad_clip=0.0, min_snr_gamma=0.0), shard=shard, batch_size=len(X0))


def test_a_step_runs_two_passes_on_heads_and_one_on_tails_drawn_from_the_generator():
    scheduler, model = NoiseScheduler(100), perturbed(unet())
    calls = recorded(model)
    generator, replayed = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    coins = []
    for _ in range(8):
        before = len(calls)
        t = torch.randint(100, (len(X0),), generator=replayed)
        noise = torch.randn(X0.shape, generator=replayed)
        coins.append(torch.rand((), generator=replayed).item() < 0.5)
        loss, _ = one_step(model, scheduler, generator)
        step = calls[before:]
        assert len(step) == (2 if coins[-1] else 1)
        assert [grad for *_, grad in step] == [False, True][-len(step):]  # the estimate: no grad
        if not coins[-1]:  # tails: zeros, and the plain L_simple of that prediction
            args, kwargs, _ = step[0]
            assert torch.count_nonzero(kwargs["x_self_cond"]) == 0
            x_t = scheduler.add_noise(X0, noise, t)
            assert torch.equal(args[0], x_t) and torch.equal(args[1], t)
            with torch.no_grad():
                expected = F.mse_loss(model(x_t, t), noise).item()
            assert loss == pytest.approx(expected, rel=1e-6)
        assert torch.equal(generator.get_state(), replayed.get_state())  # one coin, nothing else
    assert set(coins) == {True, False}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_gradients_are_those_of_one_pass_fed_the_detached_estimate(prediction_type):
    scheduler = NoiseScheduler(100, prediction_type=prediction_type)
    seed = seed_with_coin(scheduler, heads=True)
    t, noise, _, _ = replay(seed, scheduler)
    model = perturbed(unet())
    reference, leaky = copy.deepcopy(model), copy.deepcopy(model)
    calls = recorded(model)
    loss, _ = one_step(model, scheduler, torch.Generator().manual_seed(seed))

    x_t, target = scheduler.add_noise(X0, noise, t), scheduler.get_target(X0, noise, t)
    zeros = torch.zeros_like(x_t)
    with torch.no_grad():
        estimate = x0_hat(scheduler, reference(x_t, t, x_self_cond=zeros), x_t, t)
    assert torch.equal(calls[0][1]["x_self_cond"], zeros)
    assert torch.equal(calls[1][1]["x_self_cond"], estimate)
    expected = F.mse_loss(reference(x_t, t, x_self_cond=estimate), target)
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-6)  # the same L_simple target
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)

    # Were the gradient to flow through the estimate, it would differ: the check above can fail.
    live = x0_hat(scheduler, leaky(x_t, t, x_self_cond=zeros), x_t, t)
    F.mse_loss(leaky(x_t, t, x_self_cond=live), target).backward()
    difference = max((p.grad - q.grad).abs().max().item()
                     for p, q in zip(model.parameters(), leaky.parameters()))
    assert difference > 1e-4


def test_the_coin_is_drawn_last_and_the_other_options_still_compose():
    scheduler = NoiseScheduler(100, prediction_type="v_prediction")
    model = perturbed(unet(num_classes=3))
    calls = recorded(model)
    labels = torch.arange(len(X0)) % 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    generator, replayed = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    t = torch.randint(100, (len(X0),), generator=replayed)
    noise = offset_noise(torch.randn(X0.shape, generator=replayed), 0.1, replayed)
    dropped = drop_labels(labels, 3, 0.3, replayed)
    assert torch.rand((), generator=replayed).item() < 0.5  # heads for this seed: two passes
    assert not torch.equal(dropped, labels)
    loss, _ = train_step(model, scheduler, optimizer, X0, labels, generator,
                         TrainParams(grad_clip=0.0, cond_drop_prob=0.3, min_snr_gamma=5.0,
                                     offset_noise=0.1))
    assert torch.equal(generator.get_state(), replayed.get_state())
    assert len(calls) == 2 and all(torch.equal(args[2], dropped) for args, _, _ in calls)
    x_t = scheduler.add_noise(X0, noise, t)
    with torch.no_grad():
        prediction = model(x_t, t, dropped, x_self_cond=calls[1][1]["x_self_cond"])
    error = (prediction - scheduler.get_target(X0, noise, t)).square().flatten(1).mean(1)
    weights = min_snr_weights(scheduler.snr(t), 5.0, "v_prediction").float()
    assert loss == pytest.approx((weights * error).mean().item(), rel=1e-5)


def test_shards_share_the_coin_and_estimate_their_part_of_the_batch():
    scheduler = NoiseScheduler(100)
    seed = seed_with_coin(scheduler, heads=True)
    estimates = []
    for shard in (slice(None), slice(0, 4), slice(4, 8)):
        model = perturbed(unet())
        calls = recorded(model)
        one_step(model, scheduler, torch.Generator().manual_seed(seed), shard=shard)
        assert len(calls) == 2 and len(calls[1][0][0]) == len(X0[shard])
        estimates.append(calls[1][1]["x_self_cond"])
    whole, first, second = estimates
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The param, and a self-conditioned model end to end


def test_the_param_defaults_to_off_and_builds_the_model():
    assert load_params("params.yaml").model.self_condition is False
    params = from_dict({"preprocess": {"channels": 3}, "model": {"self_condition": True}})
    assert build_model(params).conv_in.in_channels == 6
    with pytest.raises(ParamsError, match=r"model\.self_condition = 'yes' must be true or false"):
        from_dict({"model": {"self_condition": "yes"}})


def test_the_diffusers_reference_refuses_self_conditioning():
    with pytest.raises(ValueError, match="model.self_condition = true: diffusers' UNet2DModel takes no x0 estimate"):
        reference_model(from_dict({"model": {"self_condition": True}}))


def test_train_save_load_and_sample_a_self_conditioned_model(tmp_path):
    raw = {section: dict(values) for section, values in TINY.items()}
    raw["model"].update(self_condition=True, num_classes=2)
    raw["train"].update(cond_drop_prob=0.2)
    train(from_dict(raw), tiny_data(), tmp_path, Recorder())  # train_step, grids, save_ema_model

    trained = load_ema_model(tmp_path / EMA_FILE, torch.device("cpu"))
    model = trained.model
    assert model.self_condition and tuple(model.conv_in.weight.shape) == (8, 2, 3, 3)
    saved = read_model_file(tmp_path / EMA_FILE).weights
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    labels = torch.tensor([0, 1])
    for method in METHODS:
        for fn in (model_fn(model, labels), denoiser(model, labels, 1.5)):
            x = sample(fn, trained.scheduler, (2, 1, SIZE, SIZE), method=method, num_steps=4,
                       generator=torch.Generator().manual_seed(0), self_condition=True)
            assert torch.isfinite(x).all() and x.abs().max() <= 1
        p = from_dict({"sample": {"method": method, "num_steps": 4, "guidance_scale": 1.0}}).sample
        images, steps = generate(trained, p, return_intermediates=True, labels=labels)
        assert images.shape == (2, 1, SIZE, SIZE) and len(steps) == 4
