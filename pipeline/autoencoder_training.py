"""Training the KL autoencoder of latent diffusion (pipeline/autoencoder.py; Rombach et al. 2022).

Each step takes a batch of training images (pipeline/batches.py: the images of step s are a
function of (autoencoder.seed, s)), encodes them, samples a latent from each posterior with the
run's generator, decodes it and takes one Adam step on the reconstruction loss plus
autoencoder.kl_weight times the KL term (`autoencoder_loss`). Checkpoints (model, optimiser, step,
random states, the log interval so far) go to the run's own folder (pipeline/checkpoint.py), and
a run started again with the same params and images resumes from the newest one, bit for bit the
run that was not interrupted (on the CPU); SIGINT and SIGTERM stop it after a step with a
checkpoint (pipeline/loop.py), as in pipeline/training.py.

At the end the latent scale is computed from the posterior modes of all training images (1 /
their standard deviation: `latent_scale`), and saved with the weights as autoencoder.safetensors;
the modes times the scale, the training images' latents, are saved beside it as a latent ImageSet
(float32, memory-mapped when loaded, with the images' labels and classes): a latent-space model
trains on them, streamed by pipeline/batches.py as images are, and encodes nothing itself.
The reconstruction PSNR of up to autoencoder.eval_images held-out images, and a grid of held-out
originals (odd rows) over their reconstructions (even rows), are logged to the `Logger`.
`reconstruction_floor` then gives the classifier FD of reconstructions of evaluate's floor images:
what a latent model's samples, decoded latents too, can reach at best.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from pipeline.autoencoder import (AUTOENCODER_FILE, LATENTS, Autoencoder, autoencoder_loss,
                                  build_autoencoder, latent_scale, psnr, save_autoencoder)
from pipeline.batches import Batches
from pipeline.checkpoint import Checkpoints, random_states, restore_random_states
from pipeline.code_digest import closure, digest
from pipeline.config import AutoencoderParams, Params, TrainParams, to_dict
from pipeline.data import ImageSet, grid_image, to_model_range, to_uint8
from pipeline.device import default_device
from pipeline.logger import Logger
from pipeline.loop import Interrupted, NewStepsOnly, due, hash_images, stop_requests
from pipeline.metrics import floor_images, reconstruction_metrics

# How a run draws its batches, part of its identity (see pipeline/training.py's BATCH_ORDER).
BATCH_ORDER = "batch_indices((autoencoder.seed, step))"
ENCODE_BATCH = 256  # images per forward pass when encoding a whole set
GRID_COLUMNS = 8


@dataclass
class AutoencoderState:
    """What a resumed run needs besides the weights, the optimiser and the random states."""
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one row per log interval
    window: dict[str, list[float]] = field(default_factory=dict)  # this log interval's losses


@dataclass(frozen=True)
class AutoencoderResult:
    state: AutoencoderState
    latent_scale: float
    psnr: float  # mean over the held-out images, dB
    grid: Image.Image  # held-out originals over their reconstructions
    model: Autoencoder  # the trained weights, in eval mode, on the training device


def fingerprint(params: Params, data: ImageSet) -> str:
    """Identity of a run: the autoencoder section, the batch order and the exact images (which
    hold the preprocess section's image size and channels)."""
    digest = hashlib.sha256(repr([to_dict(params)["autoencoder"], BATCH_ORDER]).encode())
    hash_images(digest, data.images, data.labels)
    return digest.hexdigest()


def training_code(*stage: str) -> str:
    """Digest of the code that trains a run: this module, the project modules it imports
    (pipeline/code_digest.py) and the `stage` file that calls it, but not pipeline/metrics.py,
    which only scores the reconstruction floor, on every run: a metrics change re-scores a
    finished run and does not retrain it."""
    skip = ["pipeline/metrics.py"]
    return digest(closure("pipeline/autoencoder_training.py", skip) | set(stage))


def train_autoencoder(params: Params, data: ImageSet, reference: ImageSet, out_dir: Path,
                      logger: Logger, checkpoints: Checkpoints, run_id: str | None = None,
                      device: torch.device | None = None) -> AutoencoderResult:
    """Train on `data`, evaluate on `reference`, write out_dir/autoencoder.safetensors and the
    latents of `data`, out_dir/latents.

    Resumes from the newest checkpoint of `checkpoints` (the same params and images). Raises
    Interrupted after SIGINT/SIGTERM, with a checkpoint of the last finished step, and
    ValueError at a non-finite loss. `run_id` (the tracking run) is saved with the model."""
    a = params.autoencoder
    device = device or default_device()
    torch.manual_seed(a.seed)
    model = build_autoencoder(params).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=a.lr)
    generator = torch.Generator(device).manual_seed(a.seed)
    state = resume(checkpoints, model, optimizer, generator)
    raw_logger, logger = logger, NewStepsOnly(logger)
    draws = TrainParams(batch_size=a.batch_size, seed=a.seed)  # all that Batches reads of it

    def save() -> None:
        checkpoints.save({"state": dataclasses.asdict(state), "model": model.state_dict(),
                          "optimizer": optimizer.state_dict(),
                          "random": [random_states(generator)]}, state.step)

    model.train()
    with (Batches(data, draws, slice(None), False, device, range(state.step, a.steps)) as batches,
          stop_requests() as stop):
        while state.step < a.steps:
            x, _ = next(batches)
            losses = train_step(model, optimizer, x, generator, a)
            if not all(map(math.isfinite, losses.values())):
                raise ValueError(f"autoencoder training diverged at step {state.step + 1}: "
                                 f"{losses}; try a lower autoencoder.lr (now {a.lr:g})")
            state.step += 1
            for key, value in losses.items():
                state.window.setdefault(key, []).append(value)
            if due(state.step, a.log_every, a.steps):
                row = {key: sum(values) / len(values) for key, values in state.window.items()}
                state.history.append({"step": state.step, **row})
                state.window = {}
                logger.log_metrics(row, state.step)
                print(f"train_autoencoder: step {state.step}/{a.steps}, loss {row['loss']:.4g}")
            if due(state.step, a.checkpoint_every, a.steps) or stop.signum:
                save()
            if stop.signum:
                raise Interrupted(stop.signum, state.step)
    model.eval()
    modes = encode(model, data.images, device)
    scale = latent_scale(modes)
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    save_autoencoder(out_dir / AUTOENCODER_FILE, params, weights, scale, run_id, state.step)
    # As TrainedAutoencoder.encode scales them: the same float32 numbers.
    ImageSet(modes * scale, data.labels, data.classes).save(out_dir / LATENTS)
    held_out = reference.images[:a.eval_images]
    reconstructions = reconstruct(model, held_out, device)
    quality = psnr(to_model_range(held_out), reconstructions).mean().item()
    grid = comparison_grid(held_out[:a.grid_images], reconstructions[:a.grid_images])
    if (raw_logger.last_step("psnr") or 0) < state.step:  # once, also after a late kill
        raw_logger.log_metrics({"psnr": quality, "latent_scale": scale}, state.step)
        raw_logger.log_image(grid, "reconstructions", state.step)
    return AutoencoderResult(state, scale, quality, grid, model)


def reconstruction_floor(model: Autoencoder, params: Params, data: ImageSet, reference: ImageSet,
                         classifier_path: Path) -> dict[str, float]:
    """Classifier FD/KID against the held-out set of the reconstructions (uint8, as samples are
    saved) of the evaluate stage's floor images, and of those images: the same sample.num_images
    training images, picked by evaluate.seed, with evaluate's settings, so that the numbers sit
    beside evaluate's floor_classifier_fd and classifier_fd (pipeline/metrics.py)."""
    e = params.evaluate
    originals = floor_images(data.images, params.sample.num_images, e.seed)
    device = next(model.parameters()).device
    reconstructions = to_uint8(reconstruct(model, originals, device))
    return reconstruction_metrics(reconstructions, originals, reference.images, classifier_path,
                                  e.kid_subset_size, e.batch_size, e.seed)


def train_step(model: Autoencoder, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               generator: torch.Generator, a: AutoencoderParams) -> dict[str, float]:
    """One Adam step on a batch x in the model range; the loss and its two terms."""
    optimizer.zero_grad(set_to_none=True)
    reconstruction, posterior = model(x, generator)
    loss, rec, kl = autoencoder_loss(x, reconstruction, posterior, a.kl_weight,
                                     a.reconstruction_loss)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "reconstruction": rec.item(), "kl": kl.item()}


@torch.no_grad()
def encode(model: Autoencoder, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The posterior modes of uint8 `images` [N, C, H, W], unscaled, on the CPU."""
    return torch.cat([model.encode(to_model_range(images[i:i + ENCODE_BATCH].to(device))).mode()
                      .cpu() for i in range(0, len(images), ENCODE_BATCH)])


@torch.no_grad()
def reconstruct(model: Autoencoder, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images -> their decoded posterior modes in the model range, clipped, on the CPU."""
    return torch.cat([model.decode(model.encode(to_model_range(images[i:i + ENCODE_BATCH]
                                                                .to(device))).mode())
                      .clamp(-1, 1).cpu() for i in range(0, len(images), ENCODE_BATCH)])


def comparison_grid(originals: torch.Tensor, reconstructions: torch.Tensor) -> Image.Image:
    """Rows of up to GRID_COLUMNS originals (uint8), each over their reconstructions (model
    range)."""
    columns = min(GRID_COLUMNS, len(originals))
    rows = []
    for start in range(0, len(originals), columns):
        part = slice(start, start + columns)
        rows += [originals[part], to_uint8(reconstructions[part])]
        missing = columns - len(originals[part])  # pad a short last pair of rows with black
        if missing:
            rows[-2:] = [torch.cat([r, torch.zeros_like(r[:1]).expand(missing, *r.shape[1:])])
                         for r in rows[-2:]]
    return grid_image(torch.cat(rows), columns=columns)


def resume(checkpoints: Checkpoints, model: Autoencoder, optimizer: torch.optim.Optimizer,
           generator: torch.Generator) -> AutoencoderState:
    """Restore the newest readable checkpoint of this run into the objects given, if any."""
    checkpoint = checkpoints.load()
    if checkpoint is None:
        return AutoencoderState()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    restore_random_states(checkpoint["random"][0], generator)
    return AutoencoderState(**checkpoint["state"])
