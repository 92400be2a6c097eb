"""The trained-model file, ema.pt: the EMA weights with what rebuilds and samples the model.

Written by the train stage (pipeline.training), read by the sample and evaluate stages, the
generate CLI and the MLflow model (pipeline/mlflow_model.py, whose one artifact it is). It holds

    weights   the EMA state_dict, on the CPU
    params    the preprocess (image_size, channels), model and diffusion sections
    classes   the training set's class names, in label order
    run_id    the MLflow run of its training (None if untracked)
    step      the training step it was saved at

and is read with `weights_only=True` (pipeline.io.load_torch): a crafted file cannot run code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Params, from_dict, to_dict
from pipeline.device import default_device
from pipeline.io import load_torch, save_torch
from pipeline.edm import EDM
from pipeline.noise_scheduler import NoiseScheduler, build_scheduler
from pipeline.unet import UNet, build_model


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
    save_torch({"weights": weights, "params": sections, "classes": list(classes),
                "run_id": run_id, "step": step}, path)


def load_ema_model(path: Path, device: torch.device | None = None) -> TrainedModel:
    """The saved model, in eval mode on `device` (default: pipeline.device's), with its scheduler."""
    saved: dict[str, Any] = load_torch(path)
    params = from_dict(saved["params"], check_combinations=False)  # model and diffusion only
    model = build_model(params)
    model.load_state_dict(saved["weights"])
    model.to(device or default_device()).eval()
    return TrainedModel(model, build_scheduler(params), tuple(saved["classes"]),
                        saved["run_id"], saved["step"])
