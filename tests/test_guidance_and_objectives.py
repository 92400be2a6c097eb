"""Classifier-free guidance, Min-SNR-gamma and offset noise where they are used: train_step, generate
and their params (the math itself is tested in test_sampler.py and test_noise_scheduler.py)."""

import math

import pytest
import torch

from pipeline.config import ParamsError, SampleParams, TrainParams, from_dict
from pipeline.inference import class_grid, draw_labels, generate
from pipeline.model_file import TrainedModel
from pipeline.noise_scheduler import NoiseScheduler, offset_noise
from pipeline.sampler import drop_labels
from pipeline.training import train_step
from pipeline.unet import UNet


class Spy(torch.nn.Module):
    """A one-parameter stand-in for the UNet (output 0.5 x_t) that records its inputs."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.self_condition = False
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.inputs = []

    def forward(self, x, t, labels):
        self.inputs.append((x.detach().clone(), t.clone(), None if labels is None else labels.clone()))
        return self.scale * x


def step(model, scheduler, x0, labels, **options):
    """One train_step with seed 0 (min-SNR off unless given); returns the loss and a generator
    replaying its first draws."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    generator = torch.Generator().manual_seed(0)
    loss, _ = train_step(model, scheduler, optimizer, x0, labels, generator,
                         TrainParams(grad_clip=0.0, **{"min_snr_gamma": 0.0, **options}))
    replay = torch.Generator().manual_seed(0)
    t = torch.randint(scheduler.num_timesteps, (len(x0),), generator=replay)
    noise = torch.randn(x0.shape, generator=replay)
    return loss, generator, replay, t, noise


X0 = torch.rand(64, 2, 4, 4, generator=torch.Generator().manual_seed(9)) * 2 - 1


def test_train_step_without_min_snr_is_plain_l_simple():
    scheduler, model = NoiseScheduler(100), Spy()
    loss, generator, replay, t, noise = step(model, scheduler, X0, torch.zeros(64, dtype=torch.long))
    x_t, seen_t, labels = model.inputs[0]
    assert torch.equal(seen_t, t) and torch.equal(labels, torch.zeros(64, dtype=torch.long))
    torch.testing.assert_close(x_t, scheduler.add_noise(X0, noise, t), rtol=0, atol=0)
    assert loss == pytest.approx(((0.5 * x_t - noise) ** 2).mean().item(), rel=1e-6)
    assert torch.equal(generator.get_state(), replay.get_state())  # nothing else drawn: as before


def test_train_step_drops_labels_from_the_training_generator():
    scheduler, model = NoiseScheduler(100), Spy(num_classes=3)
    labels = torch.arange(64) % 3
    _, generator, replay, _, _ = step(model, scheduler, X0, labels, cond_drop_prob=0.25)
    expected = drop_labels(labels, 3, 0.25, replay)  # the draw right after t and the noise
    assert torch.equal(model.inputs[0][2], expected) and (expected == 3).any()
    assert torch.equal(generator.get_state(), replay.get_state())
    step(model, scheduler, X0, labels, cond_drop_prob=0.25)
    assert torch.equal(model.inputs[1][2], expected)  # the same seed drops the same labels
    step(model, scheduler, X0, None, cond_drop_prob=0.25)
    assert model.inputs[2][2] is None  # an unconditional model is left alone


def test_train_step_offset_noise():
    scheduler, model = NoiseScheduler(100), Spy()
    loss, _, replay, t, noise = step(model, scheduler, X0, None, offset_noise=0.3)
    shifted = offset_noise(noise, 0.3, replay)
    x_t = model.inputs[0][0]
    torch.testing.assert_close(x_t, scheduler.add_noise(X0, shifted, t), rtol=0, atol=1e-6)
    # Epsilon prediction: the shifted noise is also the target.
    assert loss == pytest.approx(((0.5 * x_t - shifted) ** 2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_train_step_min_snr_gamma(prediction_type):
    scheduler, model = NoiseScheduler(100, prediction_type=prediction_type), Spy()
    loss, _, _, t, noise = step(model, scheduler, X0, None, min_snr_gamma=2.0)
    x_t = model.inputs[0][0].double()
    alpha_bar = scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    target = {"epsilon": noise.double(), "sample": X0.double(),
              "v_prediction": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * X0}[prediction_type]
    snr = (alpha_bar / (1 - alpha_bar)).flatten()
    weight = {"epsilon": snr.clamp(max=2) / snr, "sample": snr.clamp(max=2),
              "v_prediction": snr.clamp(max=2) / (snr + 1)}[prediction_type]
    expected = (weight * ((0.5 * x_t - target) ** 2).flatten(1).mean(1)).mean().item()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert weight.min() < 0.99 * weight.max()  # the weights differ over this batch


def trained(num_classes: int = 3) -> TrainedModel:
    torch.manual_seed(0)
    model = UNet(1, 8, base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,), num_heads=2,
                 norm_groups=4, num_classes=num_classes).eval()
    return TrainedModel(model, NoiseScheduler(50), ("a", "b", "c"), None, 0)


def seen_labels(model: UNet) -> list:
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[2]))
    return seen


def sample_params(**overrides) -> SampleParams:
    return from_dict({"sample": {"num_images": 6, "batch_size": 4, "num_steps": 2, **overrides}}).sample


def test_generate_draws_uniform_classes_from_the_seed_and_says_which():
    model = trained()
    seen = seen_labels(model.model)
    generate(model, sample_params())
    # Uniform over all 3 classes, from a CPU generator seeded with sample.seed.
    expected = torch.randint(3, (6,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw_labels(model, sample_params(), 6), expected)
    assert torch.equal(torch.cat([seen[0], seen[-1]])[:6], expected)


def test_generate_draws_only_the_chosen_classes():
    model = trained()
    seen = seen_labels(model.model)
    generate(model, sample_params(num_images=40, batch_size=40, classes=["c", "a"]))
    assert set(seen[0].tolist()) == {0, 2}


def test_generate_with_guidance_runs_conditional_and_null_together():
    model = trained()
    seen = seen_labels(model.model)
    images, _ = generate(model, sample_params(guidance_scale=2.0, classes=["b"]))
    assert images.shape == (6, 1, 8, 8)
    assert seen[0].tolist() == [1] * 4 + [3] * 4  # one forward pass: labels, then the null class


def test_class_grid_has_one_row_per_class():
    model = trained()
    seen = seen_labels(model.model)
    grid = class_grid(model, sample_params(classes=["c", "b"], batch_size=10), per_class=3)
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2)  # 8 px images with 2 px frames: 3 wide, 2 high
    assert seen[0].tolist() == [2, 2, 2, 1, 1, 1]


@pytest.mark.parametrize(
    ("num_classes", "overrides", "message"),
    [
        (0, {"guidance_scale": 2.0}, "sample.guidance_scale = 2.0 needs a class-conditional model"),
        (0, {"classes": ["a"]}, r"sample.classes = \['a'\] needs a class-conditional model"),
        (3, {"classes": ["a", "x"]}, "sample.classes: unknown class 'x'; the model's classes are 'a', 'b', 'c'"),
    ],
)
def test_generate_errors(num_classes, overrides, message):
    with pytest.raises(ValueError, match=message):
        generate(trained(num_classes), sample_params(**overrides))


def test_class_grid_of_an_unconditional_model_is_an_error():
    with pytest.raises(ValueError, match="grid per class needs a class-conditional model"):
        class_grid(trained(0), sample_params())


def test_params():
    p = from_dict({"sample": {"classes": [3, 7], "method": "dpmpp_2m", "guidance_scale": 1.5},
                   "train": {"cond_drop_prob": 0.1, "min_snr_gamma": 5, "offset_noise": 0.1}})
    assert p.sample.classes == ("3", "7")  # folder names that YAML reads as numbers
    assert (p.sample.method, p.sample.guidance_scale) == ("dpmpp_2m", 1.5)
    assert (p.train.cond_drop_prob, p.train.min_snr_gamma, p.train.offset_noise) == (0.1, 5.0, 0.1)
    defaults = from_dict({})
    assert (defaults.sample.guidance_scale, defaults.sample.classes) == (0.0, ())
    assert (defaults.train.cond_drop_prob, defaults.train.min_snr_gamma, defaults.train.offset_noise) == (0, 5.0, 0)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("sample", "classes", "3", "sample.classes = '3' must be a list of names"),
        ("sample", "classes", [1.5], r"sample.classes\[0\] = 1.5 must be a string"),
        ("sample", "guidance_scale", -1, "sample.guidance_scale = -1.0 is out of range; allowed: >= 0"),
        ("sample", "method", "dpm", "sample.method = 'dpm' is not allowed.*'dpmpp_2m'"),
        ("train", "cond_drop_prob", 1.0, "train.cond_drop_prob = 1.0 is out of range; allowed: >= 0 and < 1"),
        ("train", "min_snr_gamma", -5, "train.min_snr_gamma = -5.0 is out of range"),
        ("train", "offset_noise", -0.1, "train.offset_noise = -0.1 is out of range"),
    ],
)
def test_bad_params(section, key, value, message):
    with pytest.raises(ParamsError, match=message):
        from_dict({section: {key: value}})


def test_drop_rate_in_training_is_cond_drop_prob():
    # Over many steps of the real train_step, the null class is seen at the configured rate.
    scheduler, model = NoiseScheduler(100), Spy(num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    generator = torch.Generator().manual_seed(1)
    x0, labels = torch.zeros(500, 1, 2, 2), torch.arange(500) % 3
    for _ in range(20):
        train_step(model, scheduler, optimizer, x0, labels, generator,
                   TrainParams(grad_clip=0.0, cond_drop_prob=0.2))
    seen = torch.cat([inputs[2] for inputs in model.inputs])
    # Binomial standard error sqrt(0.2 * 0.8 / 10k) = 0.004; allow 5.
    assert (seen == 3).float().mean().item() == pytest.approx(0.2, abs=5 * math.sqrt(0.16 / len(seen)))
