"""Generate images with a trained EMA model: batches of samples, PNG files and figures.

A class-conditional model draws the classes of `sample.classes` (all if empty) and may sample
with classifier-free guidance (`sample.guidance_scale`, see pipeline.sampler.guided).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.config import SampleParams, from_dict
from pipeline.data import grid_image, to_uint8
from pipeline.io import load_torch, save_image
from pipeline.noise_scheduler import NoiseScheduler
from pipeline.sampler import guided, sample
from pipeline.training import default_device, model_fn
from pipeline.unet import UNet, build_model


@dataclass(frozen=True)
class TrainedModel:
    model: UNet
    scheduler: NoiseScheduler
    classes: tuple[str, ...]
    run_id: str | None  # the MLflow run of its training
    step: int


def load_ema_model(path: Path, device: torch.device | None = None) -> TrainedModel:
    """Rebuild the EMA model that pipeline.training saved, in eval mode, with its scheduler."""
    saved: dict[str, Any] = load_torch(path)
    params = from_dict(saved["params"], check_combinations=False)  # model and diffusion only
    model = build_model(params)
    model.load_state_dict(saved["weights"])
    model.to(device or default_device()).eval()
    scheduler = NoiseScheduler(**dataclasses.asdict(params.diffusion))
    return TrainedModel(model, scheduler, tuple(saved["classes"]), saved["run_id"], saved["step"])


def class_indices(trained: TrainedModel, names: Sequence[str]) -> list[int]:
    """The labels of the named classes, or of all classes for no names; [] for an unconditional model."""
    if trained.model.num_classes == 0:
        if names:
            raise ValueError(f"sample.classes = {list(names)} needs a class-conditional model; "
                             "this one is unconditional (model.num_classes = 0)")
        return []
    known = trained.classes[:trained.model.num_classes]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"sample.classes: unknown class {', '.join(map(repr, unknown))}; "
                         f"the model's classes are {', '.join(map(repr, known))}")
    return [known.index(name) for name in names] if names else list(range(len(known)))


def denoiser(model: UNet, labels: torch.Tensor | None, guidance_scale: float) -> Callable:
    """The `model(x_t, t)` to sample: conditioned on `labels`, guided if guidance_scale > 0."""
    if guidance_scale == 0:
        return model_fn(model, labels)
    if labels is None:
        raise ValueError(f"sample.guidance_scale = {guidance_scale} needs a class-conditional "
                         "model; this one is unconditional (model.num_classes = 0)")
    return guided(model, labels, model.num_classes, guidance_scale)


def generate(trained: TrainedModel, p: SampleParams, num_images: int | None = None,
             return_intermediates: bool = False, labels: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """uint8 images [N, C, H, W] from the configured sampler, in batches, seeded by p.seed.

    A class-conditional model draws each image's class uniformly from p.classes, or takes the
    given `labels` (one per image, which then sets N). With return_intermediates, also the x0
    predictions of every step of the first batch.
    """
    model = trained.model
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(p.seed)
    choices = torch.tensor(class_indices(trained, p.classes), dtype=torch.long, device=device)
    num_images = len(labels) if labels is not None else num_images or p.num_images
    images, intermediates = [], []
    for start in range(0, num_images, p.batch_size):
        n = min(p.batch_size, num_images - start)
        if labels is not None:
            batch_labels = labels[start:start + n].to(device)
        elif model.num_classes:
            batch_labels = choices[torch.randint(len(choices), (n,), generator=generator,
                                                 device=device)]
        else:
            batch_labels = None
        out = sample(denoiser(model, batch_labels, p.guidance_scale), trained.scheduler,
                     (n, model.in_channels, model.image_size, model.image_size),
                     method=p.method, num_steps=p.num_steps, eta=p.eta,
                     timestep_spacing=p.timestep_spacing, clip_sample=p.clip_sample,
                     variance_type=p.variance_type, generator=generator, device=device,
                     return_intermediates=return_intermediates and start == 0, progress=True)
        if return_intermediates and start == 0:
            out, intermediates = out
        images.append(to_uint8(out.cpu()))
    return torch.cat(images), [to_uint8(x.cpu()) for x in intermediates]


def class_grid(trained: TrainedModel, p: SampleParams, per_class: int = 8) -> Image.Image:
    """Samples of each class of p.classes (all if empty), one row of `per_class` per class."""
    indices = class_indices(trained, p.classes)
    if not indices:
        raise ValueError("a grid per class needs a class-conditional model; this one is "
                         "unconditional (model.num_classes = 0)")
    labels = torch.tensor(indices, dtype=torch.long).repeat_interleave(per_class)
    images, _ = generate(trained, p, labels=labels)
    return grid_image(images, columns=per_class)


def write_samples(images: torch.Tensor, folder: Path) -> None:
    """Each image as its own PNG, folder/00000.png, ... (the folder is emptied first)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    width = max(5, len(str(len(images) - 1)))
    for i, image in enumerate(images):
        array = image.permute(1, 2, 0).numpy()
        save_image(Image.fromarray(array[..., 0] if array.shape[2] == 1 else array),
                   folder / f"{i:0{width}d}.png")


def progression_image(intermediates: list[torch.Tensor], rows: int = 8, columns: int = 10
                      ) -> Image.Image:
    """Denoising progression: each row one sample, left to right its x0 prediction over steps."""
    picks = torch.linspace(0, len(intermediates) - 1, min(columns, len(intermediates))).round()
    steps = [intermediates[int(i)][:rows] for i in picks]
    tiles = torch.stack(steps, dim=1).flatten(0, 1)  # row-major: sample, then step
    return grid_image(tiles, columns=len(steps))
