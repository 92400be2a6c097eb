"""The training loop: DDPM's simple loss with AdamW, warm-up, gradient clipping, EMA and resume.

Each step takes a batch (streamed from the training images by pipeline/batches.py), draws a
uniform timestep t and Gaussian noise per image, and regresses the model output on the
scheduler's target (DDPM, Ho et al. 2020, Algorithm 1 and eq. 14, "L_simple";
the target is the noise, x0 or v depending on the prediction type), or, with
`diffusion.formulation: edm`, a log-normal noise level and EDM's preconditioned target (Karras et
al. 2022, eq. 8; pipeline/edm.py), which stand in for the scheduler's. AdamW (Loshchilov & Hutter
2019) with a linear learning-rate warm-up then cosine decay; the global gradient norm is clipped;
an EMA of the weights (pipeline/ema.py) is what gets sampled and saved. In bf16 precision the
forward pass runs under bf16 autocast; `train.precision: auto` on a CPU times a few steps both ways
before a fresh run starts (pipeline/device.py), and the checkpoints keep what it chose. With `model.self_condition`, half of the
steps first estimate x0 without gradient and feed it back (Chen et al. 2022, Algorithm 1).
With `train.hflip` each drawn image is mirrored with probability 1/2. With `train.micro_batch_size`
a step runs its batch in several forward/backward passes and adds up their gradients, so a big
batch fits a small GPU; the step, its draws and its loss are those of one pass.

Nothing is lost when a run is interrupted. Every `train.checkpoint_every` steps a checkpoint
(model, EMA, optimiser, step, every random state, the half-filled logging window and the history)
is written atomically into the run's own folder (pipeline/checkpoint.py); the newest two are
kept, and a run started again with the same params and data resumes from the newest readable
one. Since the data order is a function of the step (pipeline/batches.py) and the noise and
dropout come from the saved random states, the resumed run is bit for bit the run that was not
interrupted (on the CPU). SIGINT and SIGTERM stop the loop after the current step
with a checkpoint (`Interrupted`); a non-finite loss stops it before anything is saved
(`NonFiniteLoss`). Metrics and sample grids go to a `Logger` (pipeline/logger.py; the MLflow run
of pipeline/tracking.py is one), so this module never touches MLflow; steps that the logger
already holds, from a run killed after its last checkpoint, are not logged twice. The EMA
weights are saved as pipeline/model_file.py's ema.safetensors.

In latent space (`model.space: latent`; Rombach et al. 2022, sec. 3.2) the data are the training
images' latents, which the autoencoder's stage encoded once (pipeline/autoencoder_training.py),
and everything above runs on them unchanged. The autoencoder decodes the logged sample grids, and
the model file carries it, so that every user of the file gets images; its file's SHA-256 is part
of the run's identity, so a new autoencoder never resumes an old run. Nothing is clipped to the
pixel range [-1, 1] in latent space: neither the grids' x0 estimates nor self-conditioning's.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from pipeline.autoencoder import TrainedAutoencoder
from pipeline.batches import Batches, gather, to_device
from pipeline.checkpoint import Checkpoints, random_states, restore_random_states
from pipeline.code_digest import closure, digest
from pipeline.config import Params, TrainParams, to_dict, unet_input
from pipeline.data import ImageSet, grid_image, to_uint8
from pipeline.device import Step, choose_precision, default_device
from pipeline.distributed import World
from pipeline.edm import EDM
from pipeline.ema import EMA
from pipeline.io import atomic_path
from pipeline.logger import Logger
from pipeline.loop import Interrupted, NewStepsOnly, due, hash_images, stop_requests
from pipeline.model_file import EMA_FILE, save_ema_model
from pipeline.noise_scheduler import NoiseScheduler, build_scheduler, min_snr_weights, offset_noise
from pipeline.sampler import drop_labels, model_fn, sample
from pipeline.unet import UNet, build_model

# What a checkpoint is a checkpoint of (with the training images): resume only when they match.
RUN_SECTIONS = ("model", "diffusion", "train")
# How a run draws its batches: part of its identity, so that no checkpoint of a run that drew
# them otherwise (from the training generator, before pipeline/batches.py) is resumed.
BATCH_ORDER = "batch_indices((train.seed, step))"


class NonFiniteLoss(ValueError):
    """The loss or the gradient norm became NaN or infinite; nothing of that step was saved."""


@dataclass
class TrainState:
    """Everything a resumed run needs besides the model, EMA and optimiser weights."""
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one row per log interval
    seconds: float = 0.0  # training time so far, across resumes
    window: dict[str, list[float]] = field(default_factory=dict)  # a log interval's steps so far
    precision: str = ""  # "fp32" or "bf16", as train.precision resolved when the run started


def learning_rate(step: int, p: TrainParams) -> float:
    """Linear warm-up to p.lr over p.warmup_steps, then cosine decay to 0 at p.steps."""
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    progress = (step - p.warmup_steps) / max(1, p.steps - p.warmup_steps)
    return p.lr * 0.5 * (1 + math.cos(math.pi * progress))


def fingerprint(params: Params, data: ImageSet, processes: int = 1,
                autoencoder: TrainedAutoencoder | None = None) -> str:
    """Identity of a training run: its params sections, the exact training images (a latent
    run's latents), the number of data-parallel processes (a checkpoint holds the random state
    of each) and a latent run's autoencoder file (its SHA-256).

    Not model.gradient_checkpointing: it recomputes the same activations, so a run resumes with it
    switched either way (say, on a smaller GPU) and goes on bit for bit as before."""
    sections = to_dict(params)
    del sections["model"]["gradient_checkpointing"]
    if sections["model"]["space"] == "pixel":  # the identity from before model.space: resumable
        del sections["model"]["space"]
    identity = [sections[s] for s in RUN_SECTIONS] + [processes, BATCH_ORDER]
    if autoencoder is not None:
        identity.append(autoencoder.sha256)
    digest = hashlib.sha256(repr(identity).encode())
    hash_images(digest, data.images, data.labels)
    return digest.hexdigest()


def training_code(*stage: str) -> str:
    """Digest of the code that trains a run: this module, every project module it imports
    (pipeline/code_digest.py) and the `stage` file that calls it, as "stages/train.py". A
    finished run is taken up again only under the same digest."""
    return digest(closure("pipeline/training.py") | set(stage))


def sample_grid(model: UNet, scheduler: NoiseScheduler | EDM, p: TrainParams, classes: int,
                device: torch.device, autoencoder: TrainedAutoencoder | None = None
                ) -> Image.Image:
    """A grid of p.grid_images samples with fixed noise (the same every call): DDIM, 0 eta, or
    Heun for an EDM model (which DDIM cannot sample); a latent model's decoded by `autoencoder`,
    its latents unclipped."""
    generator = torch.Generator(device).manual_seed(p.seed)
    labels = class_labels(model, p.grid_images, classes, generator, device)
    model.eval()
    method = "heun" if isinstance(scheduler, EDM) else "ddim"
    x = sample(model_fn(model, labels), scheduler, (p.grid_images, model.in_channels,
               model.image_size, model.image_size), method=method,
               num_steps=p.grid_sampling_steps,
               timestep_spacing="trailing", clip_sample=autoencoder is None,
               generator=generator, device=device, self_condition=model.self_condition)
    model.train()
    if autoencoder is not None:
        with torch.inference_mode():
            x = autoencoder.decode(x)
    return grid_image(to_uint8(x.cpu()))


def class_labels(model: UNet, n: int, classes: int, generator: torch.Generator,
                 device: torch.device) -> torch.Tensor | None:
    """Uniformly drawn class labels for a class-conditional model, None for an unconditional one."""
    if model.num_classes == 0:
        return None
    return torch.randint(min(classes, model.num_classes), (n,), generator=generator, device=device)


def train(params: Params, data: ImageSet, out_dir: Path, logger: Logger,
          run_id: str | None = None, world: World | None = None,
          checkpoints: Checkpoints | None = None,
          autoencoder: TrainedAutoencoder | None = None) -> TrainState:
    """Train on `data`, writing out_dir/ema.safetensors; return the final state.

    In latent space `data` is the latent set of the images that `autoencoder` encoded (a
    ValueError otherwise), and the model file carries `autoencoder`.

    Checkpoints go to `checkpoints` (default: this run's folder under out_dir/checkpoints; see
    pipeline/checkpoint.py), and training resumes from the newest checkpoint of the same params
    and data, if there is one. `run_id`
    names the tracking run that `logger` writes to; it is saved with the model so the sample and
    evaluate stages can add to the same run. Raises Interrupted after SIGINT/SIGTERM (with a
    checkpoint of the last finished step) and NonFiniteLoss when the loss diverges. `world` is
    this process's place among data-parallel ranks (pipeline/distributed.py); only rank 0 logs
    and writes files.
    """
    check_space(params, data, autoencoder)
    p = params.train
    world = world or World(device=default_device())
    device = world.device
    if autoencoder is not None:
        autoencoder.model.to(device)  # it decodes the sample grids
    torch.manual_seed(p.seed)
    model = build_model(params).to(device)
    network = DistributedDataParallel(model) if world.size > 1 else model
    if p.compile:  # the compiled network shares model's parameters; model is what gets saved
        network = torch.compile(network)
    torch.manual_seed(p.seed + world.rank)  # dropout masks: each rank draws its own
    scheduler = build_scheduler(params)
    ema = EMA(model, decay=p.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    generator = torch.Generator(device).manual_seed(p.seed)
    checkpoints = checkpoints or Checkpoints(out_dir / "checkpoints",
                                             fingerprint(params, data, world.size, autoencoder),
                                             training_code())
    state = resume(checkpoints, model, ema, optimizer, generator, world.rank)
    logger = NewStepsOnly(logger)
    clip = autoencoder is None  # self-conditioning's estimate: clipped to the pixel range only
    if not state.precision:  # a fresh run; a resumed one keeps its precision, for bit-exactness
        state.precision = run_precision(model, scheduler, data, p, world, logger, clip)
    bf16 = state.precision == "bf16"
    window = Window(state.window)

    def save() -> None:
        states = world.gather(random_states(generator))  # a collective: every rank calls it
        state.window = window.state()
        if world.is_main:
            checkpoints.save({"state": dataclasses.asdict(state), "model": model.state_dict(),
                              "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                              "random": states}, state.step)

    model.train()
    shard = world.shard(p.batch_size)
    with (Batches(data, p, shard, model.num_classes > 0, device, range(state.step, p.steps))
          as batches, stop_requests() as stop):
        while state.step < p.steps:
            lr = set_learning_rate(optimizer, learning_rate(state.step, p))
            x0, batch_labels = next(batches)
            loss, grad_norm = train_step(network, scheduler, optimizer, x0, batch_labels,
                                         generator, p, bf16, shard, p.batch_size, clip)
            loss, signum = world.agree(loss, stop.signum)
            check_finite(loss, grad_norm, state.step + 1, p, state.precision, checkpoints)
            ema.update(model)
            state.step += 1
            window.add(loss, grad_norm, p.batch_size)
            if due(state.step, p.log_every, p.steps):
                log_interval(state, window.flush(), lr, logger)
            if world.is_main and due(state.step, p.sample_every, p.steps):
                with ema.swapped_in(model):
                    image = sample_grid(model, scheduler, p, len(data.classes), device,
                                        autoencoder)
                logger.log_image(image, "sample_grid", state.step)
            if due(state.step, p.checkpoint_every, p.steps) or signum:
                save()
            if signum:
                raise Interrupted(signum, state.step)
    if world.is_main:
        save_ema_model(out_dir / EMA_FILE, params, ema_weights(model, ema), data.classes, run_id,
                       state.step, autoencoder)
    return state


def check_space(params: Params, data: ImageSet, autoencoder: TrainedAutoencoder | None) -> None:
    """A ValueError unless `data` can be what the UNet of `params` denoises: in pixel space the
    images, without an autoencoder; in latent space float32 latents of `autoencoder`'s shape."""
    if params.model.space == "pixel":
        if autoencoder is not None:
            raise ValueError("model.space = 'pixel' trains on the images, without an autoencoder")
        return
    if autoencoder is None:
        raise ValueError("model.space = 'latent' needs the trained autoencoder (stage "
                         "train_autoencoder) and its latents of the training images")
    channels, side = unet_input(params)
    shape = (channels, side, side)
    if data.images.dtype != torch.float32 or tuple(data.images.shape[1:]) != shape or \
            tuple(autoencoder.model.latent_shape) != shape:
        raise ValueError(f"model.space = 'latent': the UNet denoises latents of shape {shape} "
                         f"(autoencoder.latent_channels, image_size / autoencoder.factor), but the "
                         f"training data are {data.images.dtype} {tuple(data.images.shape[1:])} "
                         f"and the autoencoder's latents {autoencoder.model.latent_shape}; train on "
                         "the latents of the autoencoder of these params")


PRECISION_PARAM = "train.precision_resolved"  # the tracking param of TrainState.precision


def run_precision(model: UNet, scheduler: NoiseScheduler, data: ImageSet, p: TrainParams,
                  world: World, logger: Logger, clip: bool = True) -> str:
    """The precision of a fresh run, recorded in the logger, the same on every rank.

    A run that the logger already holds (killed before its first checkpoint) keeps the
    precision its logged steps were computed in; else "auto" on a CPU times a few steps of this
    model at this batch (`probe_step`) in fp32 and bf16 and takes the faster.
    """
    logged = logger.param(PRECISION_PARAM)
    chosen, note = logged, " (as the tracking run recorded)"
    if logged is None and world.is_main:
        chosen, note = choose_precision(
            p.precision, world.device,
            lambda: probe_step(model, scheduler, data, p, world, clip))
    chosen = world.from_main(chosen)
    if world.is_main:
        print(f"train: precision {p.precision} -> {chosen}{note}")
    if logged is None:
        logger.log_params({PRECISION_PARAM: chosen})
    return chosen


def probe_step(model: UNet, scheduler: NoiseScheduler, data: ImageSet, p: TrainParams,
               world: World, clip: bool = True) -> Step:
    """One training step for pipeline.device's probe: on a copy of the model, with its own
    optimiser and generator, so that the run's weights and draws are those of a run without it,
    on the batches of the run's first steps, loaded as the run loads them (without the thread:
    a batch is a function of its step, so loading one draws nothing from the run's generators)."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    generator = torch.Generator(world.device).manual_seed(p.seed)
    shard, steps = world.shard(p.batch_size), itertools.count()

    def step(bf16: bool) -> None:
        rows = gather(data, next(steps), p, shard, model.num_classes > 0, world.device)
        x0, labels = to_device(rows, world.device)
        train_step(model, scheduler, optimizer, x0, labels, generator, p, bf16, shard,
                   p.batch_size, clip)

    return step


def random_hflip(x: torch.Tensor, generator: torch.Generator, batch_size: int = 0,
                 shard: slice = slice(None)) -> torch.Tensor:
    """Each image of x [B, C, H, W] mirrored left-right with probability 1/2, by coins from
    `generator`: the augmentation of DDPM's CIFAR-10 run (Ho et al. 2020, Appendix B) and EDM's
    x-flips (Karras et al. 2022, Appendix F.1). The coins cover a batch of `batch_size` images
    (0: x is the whole batch) whose part `shard` x is (see train_step)."""
    flip = torch.rand(batch_size or len(x), generator=generator, device=x.device)[shard] < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def log_interval(state: TrainState, window: dict[str, float], lr: float, logger: Logger) -> None:
    """Record one logging interval's means (Window.flush) in the history and the logger."""
    row = {"step": state.step, "lr": lr, **window}
    state.history.append(row)
    state.seconds += row["seconds"]
    logger.log_metrics({k: v for k, v in row.items() if k != "step"}, state.step)


def ema_weights(model: UNet, ema: EMA) -> dict[str, torch.Tensor]:
    """The EMA weights as a state_dict of `model`, on the CPU."""
    with ema.swapped_in(model):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def check_finite(loss: float, grad_norm: float, step: int, p: TrainParams, precision: str,
                 checkpoints: Checkpoints) -> None:
    """Stop at the first non-finite loss or gradient: the weights are garbage from here on."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    causes = [f"a learning rate too high (train.lr = {p.lr:g}, train.warmup_steps = "
              f"{p.warmup_steps})",
              f"no or loose gradient clipping (train.grad_clip = {p.grad_clip:g})"]
    if precision == "bf16":
        causes.append(f"bf16 overflow (train.precision = {p.precision}; try fp32)")
    causes.append("broken training images")
    saved = checkpoints.newest()
    kept = f"the last good checkpoint, {saved}, is kept" if saved else "no checkpoint was written"
    raise NonFiniteLoss(f"training diverged at step {step}: loss {loss}, gradient norm "
                        f"{grad_norm}. Likely causes: {'; '.join(causes)}. Training stopped; {kept}")


def train_step(model: UNet, scheduler: NoiseScheduler | EDM, optimizer: torch.optim.Optimizer,
               x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
               p: TrainParams, bf16: bool = False, shard: slice = slice(None),
               batch_size: int = 0, clip: bool = True) -> tuple[float, float]:
    """One optimiser step on L_simple (EDM's eq. 8 for an EDM `scheduler`); returns (loss,
    gradient norm before clipping).

    The options of `p` (off, or 0 = off; each draws from `generator` only when on): random
    horizontal flips (p.hflip), labels dropped to the null class with probability
    p.cond_drop_prob, Min-SNR-gamma loss weights, offset noise of strength p.offset_noise; the
    global gradient norm is clipped to p.grad_clip. A self-conditioned UNet also gets its own
    estimate (see `self_condition_input`), clipped to [-1, 1] if `clip` (pixel space).
    The random draws cover the whole batch of `batch_size` images (0: x0 is the whole batch), so
    every rank draws the same; x0 holds the batch's images at `shard` (this rank's, under
    DistributedDataParallel `model`, which averages the gradients of the ranks), `labels` all of
    its labels. The step trains on the shard in passes of p.micro_batch_size images
    (`micro_batches`) whose gradients add up to the shard's.
    """
    batch_size = batch_size or len(x0)
    if p.hflip:
        x0 = random_hflip(x0, generator, batch_size, shard)
    t = scheduler.draw_timesteps(batch_size, generator, x0.device)[shard]  # EDM: log-normal sigma
    noise = torch.randn((batch_size, *x0.shape[1:]), generator=generator, device=x0.device)
    if p.offset_noise > 0:
        noise = offset_noise(noise, p.offset_noise, generator)
    noise = noise[shard]
    if p.cond_drop_prob > 0 and labels is not None:
        labels = drop_labels(labels, unwrap(model).num_classes, p.cond_drop_prob, generator)
    labels = None if labels is None else labels[shard]
    # Self-conditioning: one coin for the whole batch, Algorithm 1's `uniform(0, 1) > 0.5` per
    # step; drawn before sharding, so every rank agrees on it.
    self_condition = unwrap(model).self_condition
    estimate = self_condition and torch.rand((), generator=generator, device=x0.device).item() < 0.5
    optimizer.zero_grad(set_to_none=True)
    parts = micro_batches(len(x0), p.micro_batch_size)
    loss = torch.zeros((), device=x0.device)
    for part in parts:
        # Each part's mean loss weighted by its share of the shard: the parts' gradients then add
        # up to the gradient of the shard's mean loss (gradient accumulation), their losses to it.
        share = (part.stop - part.start) / len(x0)
        with gradient_sync(model, part is parts[-1]):
            part_loss = share * batch_loss(model, scheduler, x0[part], noise[part], t[part],
                                           None if labels is None else labels[part], estimate, p,
                                           bf16, clip)
            part_loss.backward()
        loss += part_loss.detach()
    max_norm = p.grad_clip if p.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    return loss.item(), grad_norm.item()


def micro_batches(images: int, size: int) -> list[slice]:
    """The parts of a shard of `images` images that a step's passes train on: pieces of `size`
    images (0: in one piece; the config makes `size` divide it)."""
    size = size or images
    return [slice(i, min(i + size, images)) for i in range(0, images, size)]


def gradient_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DistributedDataParallel averages the gradients over the ranks in every backward pass;
    but for a step's last pass (`sync`), no_sync lets them accumulate on each rank instead, so
    the ranks communicate once per step."""
    ddp = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    if sync or not isinstance(ddp, DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


def batch_loss(model: UNet, scheduler: NoiseScheduler | EDM, x0: torch.Tensor, noise: torch.Tensor,
               t: torch.Tensor, labels: torch.Tensor | None, estimate: bool, p: TrainParams,
               bf16: bool, clip: bool = True) -> torch.Tensor:
    """The mean loss over images x0 with their drawn noise, timesteps and labels (train_step)."""
    x_t = scheduler.add_noise(x0, noise, t)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
        if unwrap(model).self_condition:
            x_self_cond = self_condition_input(unwrap(model), scheduler, x_t, t, labels, estimate,
                                               clip)
            prediction = model(x_t, t, labels, x_self_cond=x_self_cond)
        else:
            prediction = model(x_t, t, labels)
    target = scheduler.get_target(x0, noise, t)
    if p.min_snr_gamma > 0 and isinstance(scheduler, NoiseScheduler):  # EDM weights by itself
        weights = min_snr_weights(scheduler.snr(t), p.min_snr_gamma, scheduler.prediction_type)
        squared_error = F.mse_loss(prediction.float(), target, reduction="none").flatten(1).mean(1)
        return (weights.to(squared_error) * squared_error).mean()
    return F.mse_loss(prediction.float(), target)


def self_condition_input(model: UNet, scheduler: NoiseScheduler, x_t: torch.Tensor,
                         t: torch.Tensor, labels: torch.Tensor | None, estimate: bool,
                         clip: bool = True) -> torch.Tensor:
    """The second input of a self-conditioned UNet in training (Chen et al. 2022, Algorithm 1):
    zeros, or with `estimate` the model's own x0 prediction from a pass fed zeros.

    The estimating pass runs without gradient (the paper's stop_gradient), so it costs a forward
    pass only and needs none of DistributedDataParallel's gradient hooks: `model` is the bare
    UNet. The estimate is clipped to the data range [-1, 1], as the sampler clips the x0_hat it
    feeds back (sample.clip_sample, on by default): with epsilon prediction near t = T, x0_hat
    amplifies the noise error by 1 / sqrt(abar_t), about 150 for the default schedule. Latents
    have no such range, and a latent model's sampler does not clip: with `clip` False neither
    does this.
    """
    zeros = torch.zeros_like(x_t)
    if not estimate:
        return zeros
    with torch.no_grad():
        output = model(x_t, t, labels, x_self_cond=zeros)
    x0 = scheduler.predict_x0(output.float(), x_t, t)
    return x0.clamp(-1.0, 1.0) if clip else x0


def unwrap(model: torch.nn.Module) -> UNet:
    """The UNet inside torch.compile's and DistributedDataParallel's wrappers, if any."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    return model.module if isinstance(model, DistributedDataParallel) else model


class Window:
    """Running means of loss and gradient norm, and throughput, over one logging interval.

    Its state goes into checkpoints, so that the interval a run is resumed in averages the same
    steps as in a run that was not interrupted.
    """

    def __init__(self, state: dict[str, list[float]] | None = None) -> None:
        self.restore(state or {})

    def restore(self, state: dict[str, list[float]]) -> None:
        self.losses = list(state.get("losses", []))
        self.norms = list(state.get("norms", []))
        self.images = int(sum(state.get("images", [])))
        self.earlier = sum(state.get("seconds", []))  # time spent in this interval before a resume
        self.start = time.perf_counter()

    def add(self, loss: float, grad_norm: float, images: int) -> None:
        self.losses.append(loss)
        self.norms.append(grad_norm)
        self.images += images

    def state(self) -> dict[str, list[float]]:
        return {"losses": list(self.losses), "norms": list(self.norms), "images": [self.images],
                "seconds": [self.earlier + time.perf_counter() - self.start]}

    def flush(self) -> dict[str, float]:
        seconds = self.earlier + time.perf_counter() - self.start
        row = {"loss": sum(self.losses) / len(self.losses),
               "grad_norm": sum(self.norms) / len(self.norms),
               "images_per_s": self.images / seconds, "seconds": seconds}
        self.restore({})
        return row


def resume(checkpoints: Checkpoints, model: UNet, ema: EMA, optimizer: torch.optim.Optimizer,
           generator: torch.Generator, rank: int = 0) -> TrainState:
    """Restore the newest readable checkpoint of this run into the objects given, if any."""
    checkpoint = checkpoints.load()
    if checkpoint is None:
        return TrainState()
    model.load_state_dict(checkpoint["model"])
    ema.load_state_dict(checkpoint["ema"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    restore_random_states(checkpoint["random"][rank], generator)
    return TrainState(**checkpoint["state"])


def save_history(path: Path, history: list[dict[str, float]]) -> None:
    """The logged training curves as CSV, for `dvc plots show`."""
    columns = ["step", "loss", "lr", "grad_norm", "images_per_s"]
    lines = [",".join(columns)] + [",".join(f"{row[c]:.6g}" for c in columns) for row in history]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def summary(state: TrainState, model_parameters: int) -> dict[str, float]:
    """Final numbers of a training run, for the DVC metrics file."""
    tail = state.history[-max(1, len(state.history) // 10):]  # last tenth of the run
    images = sum(row["images_per_s"] * row["seconds"] for row in state.history)
    return {"steps": state.step, "final_loss": sum(r["loss"] for r in tail) / len(tail),
            "train_seconds": state.seconds, "images_per_s": images / max(state.seconds, 1e-9),
            "parameters": model_parameters}
