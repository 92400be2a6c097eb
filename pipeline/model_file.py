"""The trained-model file, ema.safetensors: the EMA weights, with what rebuilds and samples the
model.

Written by the train stage (pipeline.training), read by the sample and evaluate stages, the
generate CLI, the export to diffusers (pipeline/export.py) and the MLflow model
(pipeline/mlflow_model.py, whose one artifact it is). It is a safetensors file: its tensors are

    the EMA state_dict of pipeline.unet.UNet
    a latent model's autoencoder, its state_dict under "autoencoder."

and its string metadata, each value JSON,

    params       the preprocess (image_size, channels), model and diffusion sections; for a
                 latent model (model.space latent) also its autoencoder's section
    classes      the training set's class names, in label order
    run_id       the MLflow run of its training (null if untracked)
    step         the training step it was saved at
    autoencoder  a latent model's only: its autoencoder's metadata, with the SHA-256 of the
                 autoencoder.safetensors it was trained with (pipeline/autoencoder.py)

A latent model (Rombach et al. 2022) thus carries the autoencoder that decodes its samples:
`TrainedModel.to_images` turns what the sampler draws into images, for every user of the file.

so it holds no pickle and loads in any language that reads safetensors. Models saved before this
format, torch files named ema.pt, are still read, with `weights_only=True`
(pipeline.io.load_torch): a crafted file cannot run code either way.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.autoencoder import TrainedAutoencoder, autoencoder_from
from pipeline.config import Params, from_dict, to_dict
from pipeline.device import default_device
from pipeline.edm import EDM
from pipeline.io import load_safetensors, load_torch, save_safetensors
from pipeline.noise_scheduler import NoiseScheduler, build_scheduler
from pipeline.unet import UNet, build_model

EMA_FILE = "ema.safetensors"  # the file's name in the train stage's folder
METADATA = ("params", "classes", "run_id", "step")
AUTOENCODER_KEY = "autoencoder"  # a latent model's metadata key, and its weights' prefix + "."


@dataclass(frozen=True)
class ModelFile:
    """The file's contents, as saved."""

    params: Params  # its preprocess, model and diffusion sections; the others are defaults
    weights: dict[str, torch.Tensor]
    classes: tuple[str, ...]
    run_id: str | None  # the MLflow run of its training
    step: int
    autoencoder: TrainedAutoencoder | None = None  # a latent model's, on the CPU


@dataclass(frozen=True)
class TrainedModel:
    model: UNet
    scheduler: NoiseScheduler | EDM  # its formulation: DDPM's or EDM's (diffusion.formulation)
    classes: tuple[str, ...]
    run_id: str | None  # the MLflow run of its training
    step: int
    autoencoder: TrainedAutoencoder | None = None  # a latent model's, on the model's device

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """What the sampler drew -> images in the model range (not clipped): a latent model's
        latents decoded by its autoencoder (Rombach et al. 2022), a pixel model's as they are."""
        if self.autoencoder is None:
            return x
        with torch.inference_mode():
            return self.autoencoder.decode(x)


def save_ema_model(path: Path, params: Params, weights: dict[str, torch.Tensor],
                   classes: tuple[str, ...], run_id: str | None, step: int,
                   autoencoder: TrainedAutoencoder | None = None) -> None:
    """Write the file; a latent model's with `autoencoder`, which its params' space needs."""
    if (autoencoder is not None) != (params.model.space == "latent"):
        raise ValueError(f"model.space = {params.model.space!r}: a model file holds an "
                         "autoencoder exactly when the model is a latent one")
    sections = to_dict(params)
    sections = {"preprocess": {k: sections["preprocess"][k] for k in ("image_size", "channels")},
                "model": sections["model"], "diffusion": sections["diffusion"]}
    if autoencoder is not None:
        sections[AUTOENCODER_KEY] = to_dict(autoencoder.params)["autoencoder"]
    metadata = {"params": sections, "classes": list(classes), "run_id": run_id, "step": step}
    tensors = dict(weights)
    if autoencoder is not None:
        metadata[AUTOENCODER_KEY] = autoencoder.metadata()
        tensors.update({f"{AUTOENCODER_KEY}.{k}": v.detach().cpu()
                        for k, v in autoencoder.model.state_dict().items()})
    save_safetensors(tensors, {key: json.dumps(value) for key, value in metadata.items()}, path)


def read_model_file(path: Path) -> ModelFile:
    """The file's contents; KeyError naming what a file that is not a model file lacks."""
    if zipfile.is_zipfile(path):  # a torch file: the ema.pt of earlier versions
        saved = load_torch(path)
    else:
        weights, metadata = load_safetensors(path)
        saved = {"weights": weights, **{key: json.loads(metadata[key]) for key in METADATA}}
        if AUTOENCODER_KEY in metadata:
            saved[AUTOENCODER_KEY] = json.loads(metadata[AUTOENCODER_KEY])
    params = from_dict(saved["params"], check_combinations=False)  # model and diffusion only
    weights, autoencoder = split_autoencoder(saved["weights"], saved.get(AUTOENCODER_KEY))
    return ModelFile(params, weights, tuple(saved["classes"]), saved["run_id"], saved["step"],
                     autoencoder)


def split_autoencoder(tensors: dict[str, torch.Tensor], metadata: dict | None
                      ) -> tuple[dict[str, torch.Tensor], TrainedAutoencoder | None]:
    """The UNet's weights, and the autoencoder of a latent model's file (None without one)."""
    prefix = f"{AUTOENCODER_KEY}."
    if metadata is None:
        return tensors, None
    unet = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    inner = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    return unet, autoencoder_from(inner, metadata)


def load_ema_model(path: Path, device: torch.device | None = None) -> TrainedModel:
    """The saved model, in eval mode on `device` (default: pipeline.device's), with its scheduler."""
    saved = read_model_file(path)
    model = build_model(saved.params)
    model.load_state_dict(saved.weights)
    device = device or default_device()
    model.to(device).eval()
    if saved.autoencoder is not None:
        saved.autoencoder.model.to(device)
    return TrainedModel(model, build_scheduler(saved.params), saved.classes, saved.run_id,
                        saved.step, saved.autoencoder)
