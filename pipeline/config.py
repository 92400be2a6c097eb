"""Typed, validated experiment parameters: params.yaml is the single source of every hyperparameter.

`load_params("params.yaml")` returns a frozen `Params` with one section per DVC stage or concern
(preprocess, autoencoder, model, diffusion, train, sample, classifier, evaluate,
tracking). Every field has a
default, so a partial file works. Bad input raises `ParamsError` before anything runs: an unknown
key names its section and the closest valid names, a wrong type or out-of-range value names the
dotted key, the value and what is allowed. Then combinations that each key allows alone but the
pipeline cannot run (an image size the UNet cannot halve often enough, more sampling steps than
timesteps, ...) raise one ParamsError naming every key involved, so every stage's `load_params`
fails before any work starts. `check_data_size` and `check_classes` add the checks that need the
loaded data.
`flatten(params)` gives the dotted keys (`train.lr`) that `dvc exp run -S` and the MLflow run's
params use.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ParamsError(ValueError):
    """params.yaml holds a key, type or value that the pipeline cannot use."""


# The choices of the params below, defined here once: the library accepts exactly these
# (pipeline.noise_scheduler, pipeline.sampler and the CLIs read them through `choices`).
Formulation = Literal["ddpm", "edm"]
Schedule = Literal["linear", "scaled_linear", "cosine", "sigmoid", "exponential"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
Precision = Literal["auto", "fp32", "bf16"]
SamplingMethod = Literal["ddpm", "ddim", "dpmpp_2m", "heun", "edm_stochastic"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]
VarianceType = Literal["fixed_small", "fixed_large"]
ReconstructionLoss = Literal["l1", "mse"]
Space = Literal["pixel", "latent"]


def choices(literal: Any) -> tuple[Any, ...]:
    """The values of a Literal type above, in their order: choices(VarianceType)."""
    return typing.get_args(literal)


def check_choice(argument: str, value: object, literal: Any) -> None:
    """For the library's own arguments: raise ValueError naming `argument` and `value` unless
    `value` is one of the Literal's choices."""
    allowed = choices(literal)
    if value not in allowed:
        raise ValueError(f"{argument} must be one of {', '.join(map(repr, allowed))}; "
                         f"got {value!r}")


def spec(default: Any, *, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False) -> Any:
    """A dataclass field with an allowed range [low, high] (open ends with low_open/high_open)."""
    range_ = dict(low=low, high=high, low_open=low_open, high_open=high_open)
    return field(default=default, metadata=range_)


@dataclass(frozen=True)
class PreprocessParams:
    # ImageFolder root <data_dir>/<split>/<class>/<image>: a folder, or a .zip / .tar(.gz) of one
    data_dir: str = "data/images.zip"
    train_split: str = "train"  # subfolder of training images; "" when data_dir has no splits
    test_split: str = "test"  # held-out subfolder; "" holds out `holdout_fraction` of the images
    holdout_fraction: float = spec(0.1, low=0.0, high=1.0, low_open=True, high_open=True)
    image_size: int = spec(28, low=8, high=1024)  # side length after resize + centre crop
    channels: Literal[1, 3] = 1  # 1 = grey, 3 = RGB
    max_train_images: int = spec(0, low=0)  # 0 = all; else a random subset (quick experiments)
    max_reference_images: int = spec(10000, low=1)  # cap on the held-out set kept for evaluation
    seed: int = 0  # for the hold-out split and the reference subset
    # A corrupt, truncated, non-image or too-small file, or an empty class folder: stop with an
    # error naming it, or (skip) warn, leave it out and report the count.
    on_bad_image: Literal["error", "skip"] = "error"
    allow_upscale: bool = False  # enlarge images smaller than image_size; else they are bad images
    # Processes that decode, resize and crop the images; 0 = every core this process may use.
    # The outputs are the same bytes for any count.
    workers: int = spec(0, low=0)


@dataclass(frozen=True)
class AutoencoderParams:
    # The KL-regularised autoencoder of latent diffusion (pipeline/autoencoder.py; Rombach et al.
    # 2022), trained by stage train_autoencoder when model.space is latent.
    factor: Literal[2, 4, 8] = 4  # downsampling factor f: latents of image_size / f px a side
    latent_channels: int = spec(4, low=1)
    base_channels: int = spec(32, low=1)
    channel_mult: tuple[int, ...] = spec((1, 2, 2), low=1)  # one per level: log2(factor) + 1
    num_res_blocks: int = spec(1, low=1)  # per level on the encoder side (+1 on the decoder's)
    norm_groups: int = spec(8, low=1)  # GroupNorm groups
    reconstruction_loss: ReconstructionLoss = "l1"  # summed over each image's pixels
    kl_weight: float = spec(1e-6, low=0.0)  # weight of KL(q(z|x) || N(0, I)), the paper's 1e-6
    lr: float = spec(1e-3, low=0.0, low_open=True)  # Adam, constant
    steps: int = spec(2000, low=1)
    batch_size: int = spec(64, low=1)
    log_every: int = spec(50, low=1)
    checkpoint_every: int = spec(500, low=1)
    eval_images: int = spec(500, low=1)  # held-out images for the reconstruction PSNR (at most)
    grid_images: int = spec(16, low=1)  # originals against reconstructions in the logged grid
    seed: int = 0


@dataclass(frozen=True)
class ModelParams:
    # pixel: the UNet denoises the images; latent: the autoencoder's scaled latents (section
    # autoencoder), and the samples are decoded to images (Rombach et al. 2022).
    space: Space = "pixel"
    base_channels: int = spec(16, low=1)
    channel_mult: tuple[int, ...] = spec((1, 2, 4), low=1)  # one entry per resolution level
    num_res_blocks: int = spec(1, low=1)  # residual blocks per level
    attention_resolutions: tuple[int, ...] = spec((7,), low=1)  # feature-map sizes with attention
    num_heads: int = spec(4, low=1)
    dropout: float = spec(0.0, low=0.0, high=1.0, high_open=True)
    norm_groups: int = spec(8, low=1)  # GroupNorm groups
    # 0 = unconditional; else exactly the number of class folders (10: MNIST's digits; a
    # class-conditional model draws far cleaner digits in a short run, docs/quality.md)
    num_classes: int = spec(10, low=0)
    self_condition: bool = False  # also feed the model its previous x0 estimate (Chen et al. 2022)
    # Recompute each residual block's activations in the backward pass instead of keeping them:
    # less memory (docs/presets.md), 1.25x the FLOPs of a training step, the same gradients.
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class DiffusionParams:
    # ddpm: the schedule below (pipeline/noise_scheduler.py); edm: Karras et al. 2022's
    # preconditioning, noise levels and loss (pipeline/edm.py), set by the sigma_* and p_* keys.
    formulation: Formulation = "ddpm"
    num_timesteps: int = spec(1000, low=1)
    schedule: Schedule = "linear"
    beta_start: float = spec(1e-4, low=0.0, high=1.0, low_open=True, high_open=True)
    beta_end: float = spec(0.02, low=0.0, high=1.0, low_open=True, high_open=True)
    prediction_type: PredictionType = "epsilon"
    rescale_zero_terminal_snr: bool = False  # Lin et al. 2023
    sigma_data: float = spec(0.5, low=0.0, low_open=True)  # EDM: the data's standard deviation
    # (the pixels' is about 0.5; latent space's scaled latents have unit variance: 1.0)
    sigma_min: float = spec(0.002, low=0.0, low_open=True)  # EDM: the samplers' noise range
    sigma_max: float = spec(80.0, low=0.0, low_open=True, high=math.inf, high_open=True)
    p_mean: float = -1.2  # EDM training: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = spec(1.2, low=0.0, low_open=True)


@dataclass(frozen=True)
class TrainParams:
    steps: int = spec(750, low=1)
    batch_size: int = spec(64, low=1)
    # Images per forward/backward pass on each process; the gradients of the passes add up to
    # the whole batch's (EDM's --batch-gpu). 0 = the whole batch of each process in one pass.
    micro_batch_size: int = spec(0, low=0)
    hflip: bool = False  # mirror each training image left-right with probability 1/2 (pixel space)
    lr: float = spec(2e-3, low=0.0, low_open=True)
    weight_decay: float = spec(0.0, low=0.0)
    warmup_steps: int = spec(100, low=0)  # linear learning-rate warm-up
    grad_clip: float = spec(1.0, low=0.0)  # max global gradient norm; 0 disables clipping
    ema_decay: float = spec(0.995, low=0.0, high=1.0)
    precision: Precision = "auto"  # auto: bf16 on GPUs that have it; CPUs: the faster, timed
    log_every: int = spec(50, low=1)
    checkpoint_every: int = spec(500, low=1)
    sample_every: int = spec(500, low=1)  # steps between sample grids logged to MLflow
    grid_images: int = spec(64, low=1)
    grid_sampling_steps: int = spec(25, low=1)  # DDIM steps for the periodic grids
    seed: int = 0
    # Classifier-free guidance training: each label becomes the null class with this probability.
    cond_drop_prob: float = spec(0.0, low=0.0, high=1.0, high_open=True)
    min_snr_gamma: float = spec(5.0, low=0.0)  # Min-SNR-gamma loss weighting; 0 = off
    offset_noise: float = spec(0.0, low=0.0)  # strength of the per-channel noise offset; 0 = off
    num_processes: int = spec(1, low=1)  # >1: data-parallel processes on this machine (torchrun)
    compile: bool = False  # torch.compile the network (compiles for minutes; see benchmarks)


@dataclass(frozen=True)
class SampleParams:
    method: SamplingMethod = "ddpm"
    num_steps: int = spec(50, low=1)
    eta: float = spec(0.0, low=0.0, high=1.0)  # DDIM: 0 deterministic, 1 DDPM-like
    timestep_spacing: TimestepSpacing = "trailing"
    # Clip each step's x0 estimate to the pixel range [-1, 1]. A latent model (model.space
    # latent) is never clipped: its scaled latents have unit variance and no bounded range.
    clip_sample: bool = True
    variance_type: VarianceType = "fixed_small"
    num_images: int = spec(1000, low=2)
    batch_size: int = spec(250, low=1)
    seed: int = 0
    guidance_scale: float = spec(0.0, low=0.0)  # classifier-free guidance w (Ho & Salimans eq. 6)
    classes: tuple[str, ...] = ()  # class names to draw, uniformly; () = all classes
    # EDM Algorithm 2 (method edm_stochastic): noise is added (churn) at the sigmas in
    # [s_tmin, s_tmax], gamma = min(s_churn / num_steps, sqrt(2) - 1), scaled by s_noise.
    s_churn: float = spec(0.0, low=0.0)  # 0: no churn, the sampler is Heun's (Algorithm 1)
    s_tmin: float = spec(0.0, low=0.0)
    s_tmax: float = spec(math.inf, low=0.0)  # .inf in params.yaml, as in the paper
    s_noise: float = spec(1.0, low=0.0, low_open=True)
    # Of the network's forward passes. fp32 by default: bf16 autocast samples at the same quality
    # and faster on CPUs with AVX512-BF16, but 14x slower on one without it (docs/quality.md);
    # auto (timed, as train.precision) picks the faster but makes the samples depend on a timing.
    precision: Precision = "fp32"


@dataclass(frozen=True)
class ClassifierParams:
    epochs: int = spec(1, low=1)
    batch_size: int = spec(128, low=1)
    lr: float = spec(2e-3, low=0.0, low_open=True)
    feature_dim: int = spec(128, low=2)  # width of the penultimate layer used for FD/KID
    seed: int = 0


@dataclass(frozen=True)
class EvaluateParams:
    inception: bool = True  # standard FID/KID with torch-fidelity's Inception-v3
    inception_weights: str = ""  # local weights file; "" lets torch-fidelity download them
    kid_subset_size: int = spec(1000, low=2)
    batch_size: int = spec(200, low=1)
    seed: int = 0


@dataclass(frozen=True)
class TrackingParams:
    uri: str = ""  # "" = sqlite:///mlflow.db in the project root; MLFLOW_TRACKING_URI wins
    experiment: str = "simple-diffusion"
    required: bool = True  # an unreachable store stops the stage; false: go on, NOT tracked
    registered_model: str = "simple-diffusion"  # registry name of the EMA model; "" = log only


@dataclass(frozen=True)
class Params:
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    autoencoder: AutoencoderParams = field(default_factory=AutoencoderParams)
    model: ModelParams = field(default_factory=ModelParams)
    diffusion: DiffusionParams = field(default_factory=DiffusionParams)
    train: TrainParams = field(default_factory=TrainParams)
    sample: SampleParams = field(default_factory=SampleParams)
    classifier: ClassifierParams = field(default_factory=ClassifierParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read, check and type params.yaml; raise ParamsError naming the file and key on bad input."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ParamsError(f"{path}: cannot read params: {err}") from err
    try:
        return from_dict(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None


def from_dict(raw: dict[str, Any], *, check_combinations: bool = True) -> Params:
    """Build Params from nested dicts (as in params.yaml); missing keys take their defaults.

    check_combinations=False skips the cross-field checks, for the sections a checkpoint saves:
    the defaults of the sections it leaves out were never chosen, so they cannot be wrong.
    """
    if not isinstance(raw, dict):
        raise ParamsError(f"expected a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f.type for f in dataclasses.fields(Params)}
    hints = typing.get_type_hints(Params)
    _reject_unknown(raw, sections, where="section")
    values = {}
    for name, section in raw.items():
        if not isinstance(section, dict):
            raise ParamsError(f"section '{name}' must be a mapping of keys, got {section!r}")
        values[name] = _build_section(hints[name], name, section)
    params = Params(**values)
    if check_combinations:
        _check_combinations(params)
    return params


def _build_section(cls: type, name: str, raw: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(raw, fields, where=f"key in section '{name}'", prefix=f"{name}.")
    hints = typing.get_type_hints(cls)
    values = {key: _check_value(f"{name}.{key}", value, hints[key], fields[key].metadata)
              for key, value in raw.items()}
    return cls(**values)


def _reject_unknown(raw: dict[str, Any], known: dict[str, Any], where: str, prefix: str = "") -> None:
    for key in raw:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), list(known), n=3, cutoff=0.5)
        hint = (f"did you mean {', '.join(prefix + c for c in close)}?" if close
                else f"valid names: {', '.join(prefix + k for k in known)}")
        raise ParamsError(f"unknown {where}: '{prefix}{key}'; {hint}")


def _check_value(key: str, value: Any, hint: Any, meta: typing.Mapping[str, Any]) -> Any:
    value = _coerce(key, value, hint)
    _check_range(key, value, meta)
    return value


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Return value as the declared type, or raise naming the key, the value and the type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = choices(hint)
        if value not in allowed or isinstance(value, bool):
            raise ParamsError(f"{key} = {value!r} is not allowed; choose one of "
                              f"{', '.join(repr(c) for c in allowed)}")
        return value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            kind = "integers, e.g. [1, 2, 2]" if item is int else "names, e.g. [cat, dog]"
            raise ParamsError(f"{key} = {value!r} must be a list of {kind}")
        return tuple(_coerce(f"{key}[{i}]", _name(v) if item is str else v, item)
                     for i, v in enumerate(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ParamsError(f"{key} = {value!r} must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ParamsError(f"{key} = {value!r} must be an integer")
    if hint is float:
        return _as_float(key, value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ParamsError(f"{key} = {value!r} must be a string")
    raise TypeError(f"{key}: unsupported params type {hint!r}")  # a bug in this module, not input


def _name(value: Any) -> Any:
    # Folder names such as MNIST's 3 and 7 read as integers in YAML (`-S sample.classes=[3,7]`).
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _as_float(key: str, value: Any) -> float:
    # YAML 1.1 reads `1e-4` (no dot) as a string, so accept numeric strings for float keys.
    if isinstance(value, bool):
        raise ParamsError(f"{key} = {value!r} must be a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ParamsError(f"{key} = {value!r} must be a number") from None
    if math.isnan(number):  # inf is a bound (sample.s_tmax), nan would pass every range check
        raise ParamsError(f"{key} = {value!r} must be a number, not nan")
    return number


def _check_range(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    low, high = meta.get("low"), meta.get("high")
    for item in value if isinstance(value, tuple) else (value,):
        too_low = low is not None and (item <= low if meta["low_open"] else item < low)
        too_high = high is not None and (item >= high if meta["high_open"] else item > high)
        if too_low or too_high:
            raise ParamsError(f"{key} = {value!r} is out of range; allowed: {_describe_range(meta)}")


def _describe_range(meta: typing.Mapping[str, Any]) -> str:
    low, high = meta.get("low"), meta.get("high")
    parts = []
    if low is not None:
        parts.append(f"{'>' if meta['low_open'] else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if meta['high_open'] else '<='} {high:g}")
    return " and ".join(parts)


# Cross-field rules: combinations of values that each key allows alone. A rule returns what is
# wrong, naming the values and what would fix it, or None. pipeline/unet.py and
# pipeline/noise_scheduler.py check their arguments with the same functions, so each rule is
# written once; `name` turns an argument name into the name the reader knows (the dotted params
# key here, the argument itself there).

def feature_map_sizes(image_size: int, levels: int) -> list[int]:
    """Side lengths of the UNet's levels: image_size / 2**i for i = 0 .. levels - 1."""
    return [image_size // 2**i for i in range(levels)]


def unet_problem(image_size: int, base_channels: int, channel_mult: Sequence[int],
                 attention_resolutions: Sequence[int], num_heads: int, norm_groups: int,
                 name: Callable[[str], str] = str) -> str | None:
    """Why a UNet of this shape cannot be built (pipeline/unet.py), or None; all counts >= 1."""
    if not channel_mult:
        return f"{name('channel_mult')}=[] must have one entry per level, e.g. [1, 2, 2]"
    if base_channels % 2:
        return (f"{name('base_channels')}={base_channels} must be even: the sinusoidal timestep "
                f"embedding is half sines, half cosines; use e.g. {base_channels + 1}")
    levels = len(channel_mult)
    factor = 2 ** (levels - 1)
    if image_size % factor:
        max_levels = (image_size & -image_size).bit_length()  # 1 + times 2 divides image_size
        return (f"{name('image_size')}={image_size} is not divisible by 2**(levels-1)={factor}, "
                f"which {name('channel_mult')}={list(channel_mult)} ({levels} levels) needs; use "
                f"at most {max_levels} levels for {image_size} px, or an image size that is a "
                f"multiple of {factor}")
    sizes = feature_map_sizes(image_size, levels)
    unknown = [r for r in attention_resolutions if r not in sizes]
    if unknown:
        return (f"{name('attention_resolutions')}={list(attention_resolutions)}: {unknown} never "
                f"occur; the feature-map sizes for {name('image_size')}={image_size} and "
                f"{name('channel_mult')}={list(channel_mult)} are {sizes}; use some of those")
    widths = [base_channels * mult for mult in channel_mult]
    groups = norm_groups_problem(base_channels, channel_mult, norm_groups, name)
    if groups:
        return groups
    attended = [(ch, size) for ch, size in zip(widths, sizes) if size in attention_resolutions]
    for ch, size in attended:
        if ch % num_heads:
            return (f"{name('num_heads')}={num_heads} must divide the {ch} channels of the {size} "
                    f"px attention level; use {_divisors(*(c for c, _ in attended))}")
    return None


def autoencoder_problem(image_size: int, factor: int, base_channels: int,
                        channel_mult: Sequence[int], norm_groups: int,
                        name: Callable[[str], str] = str) -> str | None:
    """Why an autoencoder of this shape cannot be built (pipeline/autoencoder.py), or None:
    log2(factor) downsamplings, one per level but the last; all counts >= 1."""
    if factor not in (2, 4, 8):
        return f"{name('factor')}={factor} must be 2, 4 or 8"
    levels = int(math.log2(factor)) + 1
    if len(channel_mult) != levels:
        return (f"{name('channel_mult')}={list(channel_mult)} must have log2({name('factor')}) + 1"
                f" = {levels} entries for {name('factor')}={factor}, one per level, e.g. "
                f"{[min(2 ** i, 4) for i in range(levels)]}")
    if image_size % factor:
        return (f"{name('image_size')}={image_size} is not divisible by {name('factor')}="
                f"{factor}; use a factor that divides it, or an image size that is a multiple of "
                f"{factor}")
    return norm_groups_problem(base_channels, channel_mult, norm_groups, name)


def norm_groups_problem(base_channels: int, channel_mult: Sequence[int], norm_groups: int,
                        name: Callable[[str], str] = str) -> str | None:
    """Why GroupNorm with norm_groups groups cannot normalise every level's channels, or None."""
    widths = [base_channels * mult for mult in channel_mult]
    if not any(ch % norm_groups for ch in [base_channels, *widths]):
        return None
    return (f"{name('norm_groups')}={norm_groups} must divide {name('base_channels')}="
            f"{base_channels} and every level's channels {widths} ({name('base_channels')} * "
            f"{name('channel_mult')}); use {_divisors(base_channels, *widths)}")


def _divisors(*numbers: int) -> str:
    """'one of 1, 2, 4, 8': the numbers that divide all of numbers."""
    common = math.gcd(*numbers)
    return "one of " + ", ".join(str(d) for d in range(1, common + 1) if common % d == 0)


def beta_problem(schedule: str, beta_start: float, beta_end: float,
                 name: Callable[[str], str] = str) -> str | None:
    """Why beta_start and beta_end do not make a schedule (pipeline/noise_scheduler.py), or None.

    They are the first and last beta of every schedule but "cosine", which ignores them. Equal
    values are allowed: a constant schedule.
    """
    if schedule == "cosine" or 0 < beta_start <= beta_end < 1:
        return None
    start, end = name("beta_start"), name("beta_end")
    return (f"{start}={beta_start!r} and {end}={beta_end!r} must satisfy 0 < {start} <= {end} < 1: "
            f"they are the first and last beta of {name('schedule')}={schedule!r} (only 'cosine' "
            f"ignores them)")


def zero_terminal_snr_problem(rescale_zero_terminal_snr: bool, prediction_type: str,
                              num_timesteps: int, name: Callable[[str], str] = str) -> str | None:
    """Why the schedule cannot be rescaled to zero terminal SNR (Lin et al. 2023), or None."""
    if not rescale_zero_terminal_snr:
        return None
    rescale = f"{name('rescale_zero_terminal_snr')}=True"
    if prediction_type == "epsilon":
        return (f"{rescale} needs {name('prediction_type')} 'v_prediction' or 'sample': "
                f"{name('prediction_type')}='epsilon' cannot recover x_0 at the last timestep, "
                f"which is pure noise (abar = 0); change one of the two")
    if num_timesteps < 2:  # Lin et al. Algorithm 1 divides by sqrt(abar_0) - sqrt(abar_{T-1})
        return f"{rescale} needs {name('num_timesteps')} >= 2; got {num_timesteps}"
    return None


def _unet_key(argument: str) -> str:
    return "preprocess.image_size" if argument == "image_size" else f"model.{argument}"


def _latent_unet_key(argument: str) -> str:
    """A latent UNet's input side is the latents': the image size over the autoencoder's factor."""
    if argument == "image_size":
        return "the latent side (preprocess.image_size / autoencoder.factor)"
    return f"model.{argument}"


def _autoencoder_key(argument: str) -> str:
    return "preprocess.image_size" if argument == "image_size" else f"autoencoder.{argument}"


def unet_input(params: Params) -> tuple[int, int]:
    """The (channels, side length) of what the UNet denoises: the images', or in latent space
    the autoencoder's latents'."""
    p = params.preprocess
    if params.model.space == "latent":
        return params.autoencoder.latent_channels, p.image_size // params.autoencoder.factor
    return p.channels, p.image_size


def _unet_problems(params: Params) -> Iterator[str | None]:
    """The UNet's shape rules, for its input: the images, or the autoencoder's latents."""
    m, a = params.model, params.autoencoder
    if m.space == "latent":
        shape = autoencoder_problem(params.preprocess.image_size, a.factor, a.base_channels,
                                    a.channel_mult, a.norm_groups, _autoencoder_key)
        if shape:
            yield shape
            return
    name = _latent_unet_key if m.space == "latent" else _unet_key
    yield unet_problem(unet_input(params)[1], m.base_channels, m.channel_mult,
                       m.attention_resolutions, m.num_heads, m.norm_groups, name)


def _diffusion_key(argument: str) -> str:
    return f"diffusion.{argument}"


def _batch_problem(params: Params) -> str | None:
    """Data-parallel ranks each train on an equal share of the global batch."""
    p = params.train
    if p.batch_size % p.num_processes == 0:
        return None
    return (f"train.batch_size = {p.batch_size} does not split evenly over train.num_processes = "
            f"{p.num_processes}; use a multiple of {p.num_processes}")


def _micro_batch_problem(params: Params) -> str | None:
    """Every pass of a step trains on an equal part of the process's batch."""
    p = params.train
    per_process = p.batch_size // p.num_processes
    if p.micro_batch_size == 0 or p.batch_size % p.num_processes or \
            per_process % p.micro_batch_size == 0:
        return None
    shares = (f"train.batch_size / train.num_processes = {p.batch_size} / {p.num_processes} = "
              f"{per_process}" if p.num_processes > 1 else f"train.batch_size = {per_process}")
    return (f"train.micro_batch_size = {p.micro_batch_size} must divide each process's batch, "
            f"{shares}; use {_divisors(per_process)}, or 0 for the whole batch in one pass")


def _step_problems(params: Params) -> Iterator[str]:
    """A sampler visits each of the T training timesteps at most once (pipeline/sampler.py); an
    EDM model has no timesteps but continuous noise levels."""
    if params.diffusion.formulation == "edm":
        return
    timesteps = params.diffusion.num_timesteps
    for key, steps in [("sample.num_steps", params.sample.num_steps),
                       ("train.grid_sampling_steps", params.train.grid_sampling_steps)]:
        if steps > timesteps:
            yield (f"{key} = {steps} is more than diffusion.num_timesteps = {timesteps}, the "
                   f"timesteps a sampler can visit; use at most {timesteps}")


# The sample keys that only some methods read, and those methods: another method would ignore a
# value other than the default, so it is a mistake.
METHOD_KEYS = {"eta": ("ddim",), "variance_type": ("ddpm",), "s_churn": ("edm_stochastic",),
               "s_tmin": ("edm_stochastic",), "s_tmax": ("edm_stochastic",),
               "s_noise": ("edm_stochastic",)}
EDM_METHODS = ("heun", "edm_stochastic")


# The keys that only one formulation reads (diffusion.formulation): the other would ignore a value
# other than the default, or cannot run it.
FORMULATION_KEYS = {
    "ddpm": {"diffusion": ("num_timesteps", "schedule", "beta_start", "beta_end", "prediction_type",
                           "rescale_zero_terminal_snr"),
             "train": ("min_snr_gamma", "offset_noise"), "sample": ("timestep_spacing",)},
    "edm": {"diffusion": ("sigma_data", "sigma_min", "sigma_max", "p_mean", "p_std")},
}


def _formulation_problems(params: Params) -> Iterator[str]:
    """Settings that diffusion.formulation ignores or cannot run (pipeline/edm.py)."""
    formulation = params.diffusion.formulation
    for owner, sections in FORMULATION_KEYS.items():
        if owner == formulation:
            continue
        for section, keys in sections.items():
            values, defaults = getattr(params, section), getattr(Params(), section)
            for key in keys:
                value, default = getattr(values, key), getattr(defaults, key)
                if value != default:
                    yield (f"{section}.{key} = {value!r} is read by diffusion.formulation "
                           f"{owner!r} only, and diffusion.formulation = {formulation!r} would "
                           f"ignore it; set {section}.{key} back to {default!r} or choose that "
                           "formulation")
    d = params.diffusion
    if formulation == "edm" and params.sample.method not in EDM_METHODS:
        yield (f"sample.method = {params.sample.method!r} samples a DDPM's timesteps; "
               f"diffusion.formulation = 'edm' trains a model of continuous noise levels, which "
               f"sample.method {' or '.join(map(repr, EDM_METHODS))} samples; choose one of those")
    if formulation == "edm" and d.sigma_min >= d.sigma_max:
        yield (f"diffusion.sigma_min = {d.sigma_min!r} must be below diffusion.sigma_max = "
               f"{d.sigma_max!r}: the samplers go from sigma_max down to sigma_min")


def _sampler_problems(params: Params) -> Iterator[str]:
    """Settings that the chosen sample.method ignores or cannot run (pipeline/sampler.py)."""
    p, defaults = params.sample, SampleParams()
    for key, methods in METHOD_KEYS.items():
        value, default = getattr(p, key), getattr(defaults, key)
        if value != default and p.method not in methods:
            yield (f"sample.{key} = {value!r} is read by sample.method {' or '.join(map(repr, methods))} "
                   f"only, and sample.method = {p.method!r} would ignore it; set sample.{key} back to "
                   f"{default!r} or choose that method")
    if p.method in EDM_METHODS and params.diffusion.rescale_zero_terminal_snr:
        yield (f"sample.method = {p.method!r} starts at sigma_max = sqrt((1 - abar) / abar) of the "
               "last timestep, infinite with diffusion.rescale_zero_terminal_snr = True; use ddim or "
               "dpmpp_2m for this model")
    if p.s_churn > 0 and p.s_tmin > p.s_tmax:
        yield (f"sample.s_tmin = {p.s_tmin!r} is above sample.s_tmax = {p.s_tmax!r}: no sigma lies "
               f"between them, so sample.s_churn = {p.s_churn!r} would add no noise")


def _latent_problems(params: Params) -> Iterator[str]:
    """What a latent-space model cannot do: its training data are the cached latents of the
    unmirrored images, and the mirror image of a latent is not the latent of the mirrored image."""
    if params.model.space == "latent" and params.train.hflip:
        yield ("train.hflip = True mirrors the training data, which with model.space = 'latent' "
               "are the autoencoder's cached latents, and a mirrored latent is not the latent of "
               "the mirrored image; set train.hflip = False, or train in model.space = 'pixel'")


def _check_combinations(params: Params) -> None:
    """Raise one ParamsError naming every combination of values the pipeline cannot run."""
    d = params.diffusion
    problems = [
        *_unet_problems(params),
        beta_problem(d.schedule, d.beta_start, d.beta_end, _diffusion_key),
        zero_terminal_snr_problem(d.rescale_zero_terminal_snr, d.prediction_type,
                                  d.num_timesteps, _diffusion_key),
        *_step_problems(params),
        *_sampler_problems(params),
        *_formulation_problems(params),
        *_latent_problems(params),
        _batch_problem(params),
        _micro_batch_problem(params),
    ]
    problems = [p for p in problems if p]
    if len(problems) == 1:
        raise ParamsError(problems[0])
    if problems:
        raise ParamsError(f"{len(problems)} impossible combinations: "
                          + " ".join(f"({i}) {p}." for i, p in enumerate(problems, 1)))


def check_data_size(params: Params, num_train_images: int, section: str = "train") -> None:
    """Raise ParamsError if a training batch (of `section`: train or autoencoder) is larger than
    the training set.

    Only known once the data is loaded, so the training stages call this right after loading it.
    """
    batch_size = getattr(params, section).batch_size
    if batch_size <= num_train_images:
        return
    cap = params.preprocess.max_train_images
    capped = f" (preprocess.max_train_images = {cap})" if cap else ""
    key = f"{section}.batch_size"
    raise ParamsError(f"{key} = {batch_size} is larger than the training set, "
                      f"{num_train_images} images{capped}; use a {key} of at most "
                      f"{num_train_images}, or more training images")


def check_classes(params: Params, classes: tuple[str, ...]) -> None:
    """Raise ParamsError unless model.num_classes is 0 (unconditional) or the data's class count.

    Only known once the data is loaded, like check_data_size. Fewer would make a real label the
    UNet's null label (index num_classes, the "no label" of classifier-free guidance) or out of
    range; more would train embeddings for classes that do not exist.
    """
    num_classes = params.model.num_classes
    if num_classes in (0, len(classes)):
        return
    found = f"{len(classes)} class" + ("" if len(classes) == 1 else "es")
    raise ParamsError(f"model.num_classes = {num_classes} does not match the training images, "
                      f"which have {found} (class folders); set model.num_classes to "
                      f"{len(classes)} for a class-conditional model, or to 0 for an "
                      "unconditional one")


def flatten(params: Params) -> dict[str, Any]:
    """Params as {"section.key": value}, the keys that `dvc exp run -S` and MLflow use."""
    return {f"{section}.{key}": value
            for section, values in dataclasses.asdict(params).items()
            for key, value in values.items()}


def sample_params(options: dict[str, Any]) -> SampleParams:
    """SampleParams from `sample.*` keys (the others take their defaults), checked as params.yaml
    is: a bad value raises ParamsError naming the key and what is allowed."""
    return from_dict({"sample": options}, check_combinations=False).sample


def to_dict(params: Params) -> dict[str, dict[str, Any]]:
    """Nested plain-Python dict (lists, not tuples), as it would be written to params.yaml."""
    return {section: {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
            for section, values in dataclasses.asdict(params).items()}

