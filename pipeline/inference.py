"""Sampling a trained model: batches of images in the configured sampler, PNG files, figures.

The sample and evaluate stages, the generate CLI (pipeline/generate.py) and the MLflow model
(pipeline/mlflow_model.py) draw their images here, from a model that pipeline.model_file loaded.
A class-conditional model draws the classes of `sample.classes` (all if empty) and may sample
with classifier-free guidance (`sample.guidance_scale`, see pipeline.sampler.guided). The network
runs in `sample.precision`: under bf16 autocast or not, "auto" on a CPU timed on the first batch.
A latent model's samples (and x0 estimates) are latents, decoded to images by the autoencoder
that its file carries (`TrainedModel.to_images`), and never clipped to the pixel range
(`sample.clip_sample` clips a pixel model's only).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from pipeline.config import SampleParams
from pipeline.data import grid_image, to_uint8
from pipeline.device import Step, choose_precision
from pipeline.io import save_image
from pipeline.model_file import TrainedModel
from pipeline.sampler import Churn, guided, model_fn, sample
from pipeline.unet import UNet

PROGRESSION_ROWS = 8  # samples in the denoising-progression figure


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
    """The `model(x_t, t)` to sample: conditioned on `labels`, guided if guidance_scale > 0. Both
    forms pass the sampler's `x_self_cond=` on to a self-conditioned model."""
    if guidance_scale == 0:
        return model_fn(model, labels)
    if labels is None:
        raise ValueError(f"sample.guidance_scale = {guidance_scale} needs a class-conditional "
                         "model; this one is unconditional (model.num_classes = 0)")
    return guided(model, labels, model.num_classes, guidance_scale)


def generate(trained: TrainedModel, p: SampleParams, num_images: int | None = None,
             return_intermediates: bool = False, labels: torch.Tensor | None = None,
             progress: bool = True, intermediate_images: int | None = None
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """uint8 images [N, C, H, W] from the configured sampler, in batches, seeded by p.seed; a
    latent model's decoded.

    A class-conditional model draws image i of class `draw_labels(...)[i]`, or of `labels[i]`
    when given (which then sets N). With return_intermediates, also the x0 predictions of every
    step of the first `intermediate_images` images (None: the first batch); a latent model
    decodes each, so asking for the few a figure shows saves a decoder pass per step and image.
    `progress`: a progress bar per batch on stderr.
    """
    model = trained.model
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(p.seed)
    num_images = len(labels) if labels is not None else num_images or p.num_images
    if labels is None:
        labels = draw_labels(trained, p, num_images)
    images, intermediates = [], []
    bf16 = sampling_bf16(trained, p, labels, min(p.batch_size, num_images), progress)
    for start in range(0, num_images, p.batch_size):
        n = min(p.batch_size, num_images - start)
        batch_labels = labels[start:start + n].to(device) if labels is not None else None
        network = in_precision(denoiser(model, batch_labels, p.guidance_scale), device, bf16)
        out = sample(network, trained.scheduler,
                     (n, model.in_channels, model.image_size, model.image_size),
                     method=p.method, num_steps=p.num_steps, eta=p.eta,
                     timestep_spacing=p.timestep_spacing,
                     clip_sample=p.clip_sample and trained.autoencoder is None,
                     variance_type=p.variance_type,
                     churn=Churn(p.s_churn, p.s_tmin, p.s_tmax, p.s_noise),
                     generator=generator, device=device,
                     return_intermediates=return_intermediates and start == 0, progress=progress,
                     self_condition=model.self_condition)
        if return_intermediates and start == 0:
            out, intermediates = out
        images.append(to_uint8(trained.to_images(out).cpu()))
    return torch.cat(images), [to_uint8(trained.to_images(x[:intermediate_images]).cpu())
                               for x in intermediates]


def sampling_bf16(trained: TrainedModel, p: SampleParams, labels: torch.Tensor | None, n: int,
                  report: bool) -> bool:
    """Whether to sample under bf16 autocast: p.precision, where "auto" on a CPU times one
    forward pass of the batch both ways (pipeline.device.choose_precision)."""
    device = next(trained.model.parameters()).device
    chosen, note = choose_precision(p.precision, device,
                                    lambda: probe_forward(trained, p, labels, n))
    if report and note:
        print(f"sample: precision {p.precision} -> {chosen}{note}", file=sys.stderr)
    return chosen == "bf16"


def probe_forward(trained: TrainedModel, p: SampleParams, labels: torch.Tensor | None, n: int
                  ) -> Step:
    """One forward pass of the first batch's shape, at a training timestep, for the probe."""
    model = trained.model
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(p.seed)
    x = torch.randn((n, model.in_channels, model.image_size, model.image_size),
                    generator=generator, device=device)
    t = trained.scheduler.draw_timesteps(n, generator, device)
    network = denoiser(model, labels[:n].to(device) if labels is not None else None,
                       p.guidance_scale)

    @torch.inference_mode()
    def forward(bf16: bool) -> None:
        in_precision(network, device, bf16)(x, t)

    return forward


def in_precision(network: Callable, device: torch.device, bf16: bool) -> Callable:
    """`network` under bf16 autocast if `bf16`; its output in float32 either way, so that the
    sampler's own arithmetic stays in float32."""
    def run(*args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return network(*args, **kwargs).float()
    return run


def draw_labels(trained: TrainedModel, p: SampleParams, num_images: int) -> torch.Tensor | None:
    """The requested class of each image: uniform over p.classes (all if empty), seeded by
    p.seed on the CPU (the same on every device); None for an unconditional model."""
    choices = torch.tensor(class_indices(trained, p.classes), dtype=torch.long)
    if not len(choices):
        return None
    generator = torch.Generator().manual_seed(p.seed)
    return choices[torch.randint(len(choices), (num_images,), generator=generator)]


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


def progression_image(intermediates: list[torch.Tensor], rows: int = PROGRESSION_ROWS,
                      columns: int = 10
                      ) -> Image.Image:
    """Denoising progression: each row one sample, left to right its x0 prediction over steps."""
    picks = torch.linspace(0, len(intermediates) - 1, min(columns, len(intermediates))).round()
    steps = [intermediates[int(i)][:rows] for i in picks]
    tiles = torch.stack(steps, dim=1).flatten(0, 1)  # row-major: sample, then step
    return grid_image(tiles, columns=len(steps))
