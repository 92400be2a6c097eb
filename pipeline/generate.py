"""Generate images with a trained EMA model: batches of samples, PNG files and figures.

A class-conditional model draws the classes of `sample.classes` (all if empty) and may sample
with classifier-free guidance (`sample.guidance_scale`, see pipeline.sampler.guided).

Also the command-line generator (`main`, at the bottom; docs/generate.md):

    python -m pipeline.generate --model models:/simple-diffusion/latest --num 64 --out grid.png

MODEL is a registered model (models:/NAME/VERSION or latest), a run's logged model
(runs:/RUN_ID/model) or a local ema.pt. Of an MLflow model only the weights file is read, through
pipeline.io.load_torch: a model is never unpickled, so a crafted file cannot run code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image

from pipeline.config import SampleParams, TrackingParams, from_dict
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
    """The `model(x_t, t)` to sample: conditioned on `labels`, guided if guidance_scale > 0. Both
    forms pass the sampler's `x_self_cond=` on to a self-conditioned model."""
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

    A class-conditional model draws image i of class `draw_labels(...)[i]`, or of `labels[i]`
    when given (which then sets N). With return_intermediates, also the x0 predictions of every
    step of the first batch.
    """
    model = trained.model
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(p.seed)
    num_images = len(labels) if labels is not None else num_images or p.num_images
    if labels is None:
        labels = draw_labels(trained, p, num_images)
    images, intermediates = [], []
    for start in range(0, num_images, p.batch_size):
        n = min(p.batch_size, num_images - start)
        batch_labels = labels[start:start + n].to(device) if labels is not None else None
        out = sample(denoiser(model, batch_labels, p.guidance_scale), trained.scheduler,
                     (n, model.in_channels, model.image_size, model.image_size),
                     method=p.method, num_steps=p.num_steps, eta=p.eta,
                     timestep_spacing=p.timestep_spacing, clip_sample=p.clip_sample,
                     variance_type=p.variance_type, generator=generator, device=device,
                     return_intermediates=return_intermediates and start == 0, progress=True,
                     self_condition=model.self_condition)
        if return_intermediates and start == 0:
            out, intermediates = out
        images.append(to_uint8(out.cpu()))
    return torch.cat(images), [to_uint8(x.cpu()) for x in intermediates]


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


def progression_image(intermediates: list[torch.Tensor], rows: int = 8, columns: int = 10
                      ) -> Image.Image:
    """Denoising progression: each row one sample, left to right its x0 prediction over steps."""
    picks = torch.linspace(0, len(intermediates) - 1, min(columns, len(intermediates))).round()
    steps = [intermediates[int(i)][:rows] for i in picks]
    tiles = torch.stack(steps, dim=1).flatten(0, 1)  # row-major: sample, then step
    return grid_image(tiles, columns=len(steps))


def sample_params(options: dict[str, Any]) -> SampleParams:
    """SampleParams from `sample.*` keys (the others take their defaults), checked as params.yaml
    is: a bad value raises ParamsError naming the key and what is allowed."""
    return from_dict({"sample": options}, check_combinations=False).sample


def split_names(text: str) -> list[str]:
    """Class names from a comma-separated list: "3, 7" -> ["3", "7"]; "" -> [] (all classes)."""
    return [name.strip() for name in text.split(",") if name.strip()]


# The MLflow model's input (pipeline/mlflow_model.py) is a table with one row per request: these
# columns, with sample.* meanings; `classes` is comma-separated.
def example_request(trained: TrainedModel) -> dict[str, Any]:
    """A request for 4 images with DDIM: the input example the model is logged with."""
    return {"num_images": 4, "seed": 0, "method": "ddim",
            "num_steps": min(25, trained.scheduler.num_timesteps), "eta": 0.0,
            "guidance_scale": 0.0, "classes": ""}


def request_params(request: dict[str, Any]) -> tuple[SampleParams, int]:
    """The sampling params and the image count of one request (a row like example_request's)."""
    options = dict(request)
    num_images = options.pop("num_images")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images = {num_images!r} must be a positive integer")
    options["classes"] = split_names(options.get("classes") or "")
    return sample_params(options), num_images


# The command line. Each sampling option sets the sample.* key it names; errors say the option.
OPTIONS = {"--method": "method", "--steps": "num_steps", "--eta": "eta", "--seed": "seed",
           "--guidance": "guidance_scale", "--classes": "classes", "--batch-size": "batch_size"}
MLFLOW_SCHEMES = ("models:/", "runs:/")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(2, f"generate: error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    defaults = SampleParams()
    p = _Parser(prog="python -m pipeline.generate",
                description="Generate images with a trained simple-diffusion model.")
    p.add_argument("--model", required=True,
                   help="models:/NAME/VERSION (or latest), runs:/RUN_ID/PATH, or a local ema.pt")
    p.add_argument("--num", type=int, metavar="N", required=True, help="number of images")
    p.add_argument("--out", type=Path, required=True, metavar="PNG", help="grid of all images")
    p.add_argument("--out-dir", type=Path, metavar="DIR",
                   help="also one PNG per image here (its PNG files are replaced)")
    p.add_argument("--method", help=f"ddpm | ddim | dpmpp_2m ({defaults.method})")
    p.add_argument("--steps", dest="num_steps", type=int, metavar="S",
                   help=f"sampling steps ({defaults.num_steps}); at most the model's timesteps")
    p.add_argument("--eta", type=float, metavar="E", help=f"DDIM eta ({defaults.eta})")
    p.add_argument("--seed", type=int, metavar="K", help=f"random seed ({defaults.seed})")
    p.add_argument("--guidance", dest="guidance_scale", type=float, metavar="W",
                   help="classifier-free guidance scale w (0: none); class-conditional models")
    p.add_argument("--classes", type=split_names, metavar="A,B",
                   help="comma-separated class names to draw (all); class-conditional models")
    p.add_argument("--batch-size", dest="batch_size", type=int, metavar="B",
                   help=f"images per batch ({defaults.batch_size})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA if available (auto)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow store of models:/ and runs:/ URIs (MLFLOW_TRACKING_URI, else "
                        "the project's mlflow.db)")
    return p


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return default_device()
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


def fetch_weights(model: str, uri: str | None, folder: Path) -> Path:
    """The EMA weights file that `model` names: a local file, or the `ema` artifact of an MLflow
    model downloaded into `folder`."""
    if not model.startswith(MLFLOW_SCHEMES):
        if not Path(model).is_file():
            raise ValueError(f"--model {model}: no such file; give a local ema.pt, "
                             "models:/NAME/VERSION or runs:/RUN_ID/PATH")
        return Path(model)
    # Imported here: pipeline.tracking imports this module, and sampling alone needs no MLflow.
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from pipeline.tracking import check_readable, global_tracking_uri, tracking_uri

    uri = uri or tracking_uri(TrackingParams())
    check_readable(uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file
    try:
        with global_tracking_uri(uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model,
                                                             dst_path=str(folder)))
    except MlflowException as err:
        raise ValueError(f"--model {model}: {err.message.splitlines()[0]}") from None
    return local if local.is_file() else ema_artifact(local, model)


def ema_artifact(folder: Path, model: str) -> Path:
    """The weights file of a downloaded MLflow model, as its MLmodel file names it."""
    try:
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
        relative = mlmodel["flavors"]["python_function"]["artifacts"]["ema"]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        raise ValueError(f"--model {model}: not a simple-diffusion model (no MLmodel file "
                         "naming an 'ema' artifact)") from None
    return folder / relative


def run_cli(args: argparse.Namespace) -> None:
    if args.num < 1:
        raise ValueError(f"--num {args.num}: must be at least 1")
    p = sample_params({key: getattr(args, key) for key in OPTIONS.values()
                       if getattr(args, key) is not None})
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="generate-") as folder:
        weights = fetch_weights(args.model, args.tracking_uri, Path(folder))
        try:
            trained = load_ema_model(weights, device)
        except ValueError as err:  # UnsafeFileError, CorruptFileError, ParamsError
            raise ValueError(f"--model {args.model}: {err}") from None
        except KeyError as err:
            raise ValueError(f"--model {args.model}: not an EMA model file (the ema.pt of "
                             f"pipeline.training): it has no {err}") from None
    if p.num_steps > trained.scheduler.num_timesteps:
        raise ValueError(f"--steps {p.num_steps}: more than the model's "
                         f"{trained.scheduler.num_timesteps} timesteps")
    images, _ = generate(trained, p, num_images=args.num)
    save_image(grid_image(images), args.out)
    if args.out_dir:
        write_samples(images, args.out_dir)
    print(f"generate: {len(images)} images with {p.method}, {p.num_steps} steps, seed {p.seed}, "
          f"on {device.type} -> {args.out}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        run_cli(args)
    except ValueError as err:  # bad options, params, files and stores: one line, no traceback
        message = str(err)
        for option, key in OPTIONS.items():
            message = message.replace(f"sample.{key}", option)
        sys.exit(f"generate: error: {message}")


if __name__ == "__main__":
    main()
