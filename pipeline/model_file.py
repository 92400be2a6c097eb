"""The trained-model file, ema.safetensors: the EMA weights, with what rebuilds and samples the
model.

Written by the train stage (pipeline.training), read by the sample and evaluate stages, the
generate CLI, the export to diffusers (pipeline/export.py) and the MLflow model
(pipeline/mlflow_model.py, whose one artifact it is). It is a safetensors file: its tensors are

    the EMA state_dict of pipeline.unet.UNet

and its string metadata, each value JSON,

    params    the preprocess (image_size, channels), model and diffusion sections
    classes   the training set's class names, in label order
    run_id    the MLflow run of its training (null if untracked)
    step      the training step it was saved at

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

from pipeline.config import Params, from_dict, to_dict
from pipeline.device import default_device
from pipeline.edm import EDM
from pipeline.io import load_safetensors, load_torch, save_safetensors
from pipeline.noise_scheduler import NoiseScheduler, build_scheduler
from pipeline.unet import UNet, build_model

EMA_FILE = "ema.safetensors"  # the file's name in the train stage's folder
METADATA = ("params", "classes", "run_id", "step")


@dataclass(frozen=True)
class ModelFile:
    """The file's contents, as saved."""

    params: Params  # its preprocess, model and diffusion sections; the others are defaults
    weights: dict[str, torch.Tensor]
    classes: tuple[str, ...]
    run_id: str | None  # the MLflow run of its training
    step: int


@dataclass(frozen=True)
class TrainedModel:
    model: UNet
    scheduler: NoiseScheduler | EDM  # its formulation: DDPM's or EDM's (diffusion.formulation)
    classes: tuple[str, ...]
    run_id: str | None  # the MLflow run of its training
    step: int


def save_ema_model(path: Path, params: Params, weights: dict[str, torch.Tensor],
                   classes: tuple[str, ...], run_id: str | None, step: int) -> None:
    sections = to_dict(params)
    sections = {"preprocess": {k: sections["preprocess"][k] for k in ("image_size", "channels")},
                "model": sections["model"], "diffusion": sections["diffusion"]}
    metadata = {"params": sections, "classes": list(classes), "run_id": run_id, "step": step}
    save_safetensors(weights, {key: json.dumps(value) for key, value in metadata.items()}, path)


def read_model_file(path: Path) -> ModelFile:
    """The file's contents; KeyError naming what a file that is not a model file lacks."""
    if zipfile.is_zipfile(path):  # a torch file: the ema.pt of earlier versions
        saved = load_torch(path)
    else:
        weights, metadata = load_safetensors(path)
        saved = {"weights": weights, **{key: json.loads(metadata[key]) for key in METADATA}}
    params = from_dict(saved["params"], check_combinations=False)  # model and diffusion only
    return ModelFile(params, saved["weights"], tuple(saved["classes"]), saved["run_id"],
                     saved["step"])


def load_ema_model(path: Path, device: torch.device | None = None) -> TrainedModel:
    """The saved model, in eval mode on `device` (default: pipeline.device's), with its scheduler."""
    saved = read_model_file(path)
    model = build_model(saved.params)
    model.load_state_dict(saved.weights)
    model.to(device or default_device()).eval()
    return TrainedModel(model, build_scheduler(saved.params), saved.classes, saved.run_id,
                        saved.step)
