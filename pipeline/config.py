"""Typed, validated experiment parameters: params.yaml is the single source of every hyperparameter.

`load_params("params.yaml")` returns a frozen `Params` with one section per DVC stage or concern
(preprocess, model, diffusion, train, sample, classifier, evaluate, tracking). Every field has a
default, so a partial file works. Bad input raises `ParamsError` before anything runs: an unknown
key names its section and the closest valid names, a wrong type or out-of-range value names the
dotted key, the value and what is allowed. `flatten(params)` gives the dotted keys (`train.lr`)
that `dvc exp run -S` and the MLflow run's params use.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ParamsError(ValueError):
    """params.yaml holds a key, type or value that the pipeline cannot use."""


def spec(default: Any, *, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False) -> Any:
    """A dataclass field with an allowed range [low, high] (open ends with low_open/high_open)."""
    range_ = dict(low=low, high=high, low_open=low_open, high_open=high_open)
    return field(default=default, metadata=range_)


@dataclass(frozen=True)
class PreprocessParams:
    data_dir: str = "data"  # ImageFolder root: <data_dir>/<split>/<class>/<image>
    train_split: str = "train"  # subfolder of training images; "" when data_dir has no splits
    test_split: str = "test"  # held-out subfolder; "" holds out `holdout_fraction` of the images
    holdout_fraction: float = spec(0.1, low=0.0, high=1.0, low_open=True, high_open=True)
    image_size: int = spec(28, low=8, high=1024)  # side length after resize + centre crop
    channels: Literal[1, 3] = 1  # 1 = grey, 3 = RGB
    max_train_images: int = spec(0, low=0)  # 0 = all; else a random subset (quick experiments)
    max_reference_images: int = spec(10000, low=1)  # cap on the held-out set kept for evaluation
    seed: int = 0  # for the hold-out split and the reference subset


@dataclass(frozen=True)
class ModelParams:
    base_channels: int = spec(16, low=1)
    channel_mult: tuple[int, ...] = spec((1, 2, 4), low=1)  # one entry per resolution level
    num_res_blocks: int = spec(1, low=1)  # residual blocks per level
    attention_resolutions: tuple[int, ...] = spec((7,), low=1)  # feature-map sizes with attention
    num_heads: int = spec(4, low=1)
    dropout: float = spec(0.1, low=0.0, high=1.0, high_open=True)
    norm_groups: int = spec(8, low=1)  # GroupNorm groups
    num_classes: int = spec(0, low=0)  # 0 = unconditional


@dataclass(frozen=True)
class DiffusionParams:
    num_timesteps: int = spec(1000, low=1)
    schedule: Literal["linear", "scaled_linear", "cosine", "sigmoid", "exponential"] = "linear"
    beta_start: float = spec(1e-4, low=0.0, high=1.0, low_open=True, high_open=True)
    beta_end: float = spec(0.02, low=0.0, high=1.0, low_open=True, high_open=True)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    rescale_zero_terminal_snr: bool = False  # Lin et al. 2023


@dataclass(frozen=True)
class TrainParams:
    steps: int = spec(1500, low=1)
    batch_size: int = spec(64, low=1)
    lr: float = spec(2e-3, low=0.0, low_open=True)
    weight_decay: float = spec(0.0, low=0.0)
    warmup_steps: int = spec(100, low=0)  # linear learning-rate warm-up
    grad_clip: float = spec(1.0, low=0.0)  # max global gradient norm; 0 disables clipping
    ema_decay: float = spec(0.995, low=0.0, high=1.0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast where supported
    log_every: int = spec(50, low=1)
    checkpoint_every: int = spec(500, low=1)
    sample_every: int = spec(500, low=1)  # steps between sample grids logged to MLflow
    grid_images: int = spec(64, low=1)
    grid_sampling_steps: int = spec(25, low=1)  # DDIM steps for the periodic grids
    seed: int = 0
    # Classifier-free guidance training: each label becomes the null class with this probability.
    cond_drop_prob: float = spec(0.0, low=0.0, high=1.0, high_open=True)
    min_snr_gamma: float = spec(0.0, low=0.0)  # Min-SNR-gamma loss weighting; 0 = off
    offset_noise: float = spec(0.0, low=0.0)  # strength of the per-channel noise offset; 0 = off


@dataclass(frozen=True)
class SampleParams:
    method: Literal["ddpm", "ddim", "dpmpp_2m"] = "ddpm"
    num_steps: int = spec(100, low=1)
    eta: float = spec(0.0, low=0.0, high=1.0)  # DDIM: 0 deterministic, 1 DDPM-like
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    clip_sample: bool = True
    variance_type: Literal["fixed_small", "fixed_large"] = "fixed_small"
    num_images: int = spec(1000, low=2)
    batch_size: int = spec(250, low=1)
    seed: int = 0
    guidance_scale: float = spec(0.0, low=0.0)  # classifier-free guidance w (Ho & Salimans eq. 6)
    classes: tuple[str, ...] = ()  # class names to draw, uniformly; () = all classes


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


@dataclass(frozen=True)
class Params:
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
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


def from_dict(raw: dict[str, Any]) -> Params:
    """Build Params from nested dicts (as in params.yaml); missing keys take their defaults."""
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
    return Params(**values)


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
        choices = typing.get_args(hint)
        if value not in choices or isinstance(value, bool):
            raise ParamsError(f"{key} = {value!r} is not allowed; choose one of "
                              f"{', '.join(repr(c) for c in choices)}")
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
        return float(value)
    except (TypeError, ValueError):
        raise ParamsError(f"{key} = {value!r} must be a number") from None


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


def flatten(params: Params) -> dict[str, Any]:
    """Params as {"section.key": value}, the keys that `dvc exp run -S` and MLflow use."""
    return {f"{section}.{key}": value
            for section, values in dataclasses.asdict(params).items()
            for key, value in values.items()}


def to_dict(params: Params) -> dict[str, dict[str, Any]]:
    """Nested plain-Python dict (lists, not tuples), as it would be written to params.yaml."""
    return {section: {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
            for section, values in dataclasses.asdict(params).items()}

