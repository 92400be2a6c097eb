"""The command-line generator (docs/generate.md): images from a trained model, as a grid.

    python -m pipeline.generate --model models:/simple-diffusion/latest --num 64 --out grid.png

MODEL is a registered model (models:/NAME/VERSION or latest), a run's logged model
(runs:/RUN_ID/model) or a local ema.safetensors. Of an MLflow model only the weights file is read,
through pipeline.model_file: a model is never unpickled, so a crafted file cannot run code. The
options --method, --steps, ... set the sample.* params they name (pipeline.inference draws the
images).
Bad options, models and output paths are one-line errors, found before any sampling.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
import yaml

from pipeline.config import SampleParams, SamplingMethod, TrackingParams, choices, sample_params
from pipeline.data import grid_image
from pipeline.device import default_device
from pipeline.inference import generate, write_samples
from pipeline.io import check_image_path, save_image
from pipeline.model_file import EMA_FILE, TrainedModel, load_ema_model
from pipeline.model_request import split_names
from pipeline.noise_scheduler import NoiseScheduler

# Each sampling option sets the sample.* key it names; errors say the option.
OPTIONS = {"--method": "method", "--steps": "num_steps", "--eta": "eta", "--seed": "seed",
           "--guidance": "guidance_scale", "--classes": "classes", "--batch-size": "batch_size"}
MLFLOW_SCHEMES = ("models:/", "runs:/")
T = TypeVar("T")


class OneLineParser(argparse.ArgumentParser):
    """Bad syntax is one line, `NAME: error: ...`, NAME the module of `prog`, not argparse's usage
    block."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog.rsplit('.', 1)[-1]}: error: {message} (see --help)\n")


def add_model_argument(p: argparse.ArgumentParser) -> None:
    """--model, the model that `open_model` opens (the generator's and the export's)."""
    p.add_argument("--model", required=True,
                   help="models:/NAME/VERSION (or latest), runs:/RUN_ID/PATH, or a local "
                        f"{EMA_FILE}")


def parser() -> argparse.ArgumentParser:
    defaults = SampleParams()
    p = OneLineParser(prog="python -m pipeline.generate",
                description="Generate images with a trained simple-diffusion model.")
    add_model_argument(p)
    p.add_argument("--num", type=int, metavar="N", default=64, help="number of images (64)")
    p.add_argument("--out", type=Path, required=True, metavar="PNG", help="grid of all images")
    p.add_argument("--out-dir", type=Path, metavar="DIR",
                   help="also one PNG per image here (its PNG files are replaced)")
    p.add_argument("--method", help=f"{' | '.join(choices(SamplingMethod))} ({defaults.method})")
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
            raise ValueError(f"--model {model}: no such file; give a local {EMA_FILE}, "
                             "models:/NAME/VERSION or runs:/RUN_ID/PATH")
        return Path(model)
    # Imported here: MLflow takes seconds to import, and a local file needs none of it.
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from pipeline.tracking import check_readable, global_tracking_uri, quiet_mlflow, tracking_uri

    uri = uri or tracking_uri(TrackingParams())
    check_readable(uri)
    try:
        with global_tracking_uri(uri), quiet_mlflow():
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
    p = checked_options(args)
    device = pick_device(args.device)
    trained = load_model(args.model, args.tracking_uri, device)
    if isinstance(trained.scheduler, NoiseScheduler):  # an EDM model has no timesteps to count
        timesteps = trained.scheduler.num_timesteps
        if args.num_steps is None:  # the default, for a model of fewer timesteps: all of them
            p = dataclasses.replace(p, num_steps=min(p.num_steps, timesteps))
        if p.num_steps > timesteps:
            raise ValueError(f"--steps {p.num_steps}: more than the model's {timesteps} timesteps")
    images, _ = generate(trained, p, num_images=args.num)
    save_image(grid_image(images), args.out)
    if args.out_dir:
        write_samples(images, args.out_dir)
    print(f"generate: {len(images)} images with {p.method}, {p.num_steps} steps, seed {p.seed}, "
          f"on {device.type} -> {args.out}")


def checked_options(args: argparse.Namespace) -> SampleParams:
    """The sampling params of the options; every option and output path is checked here,
    before the model is loaded and sampled."""
    if args.num < 1:
        raise ValueError(f"--num {args.num}: must be at least 1")
    try:
        check_image_path(args.out)
    except ValueError as err:
        raise ValueError(f"--out {err}") from None
    if args.out_dir and args.out_dir.exists() and not args.out_dir.is_dir():
        raise ValueError(f"--out-dir {args.out_dir}: is a file, not a folder")
    return sample_params({key: getattr(args, key) for key in OPTIONS.values()
                          if getattr(args, key) is not None})


def load_model(model: str, tracking_uri: str | None, device: torch.device) -> TrainedModel:
    return open_model(model, tracking_uri, partial(load_ema_model, device=device))


def open_model(model: str, tracking_uri: str | None, read: Callable[[Path], T]) -> T:
    """`read` applied to the weights file that `model` names (fetch_weights); a file that is not
    a model file is a ValueError naming `model`."""
    with tempfile.TemporaryDirectory(prefix="generate-") as folder:
        weights = fetch_weights(model, tracking_uri, Path(folder))
        try:
            return read(weights)
        except ValueError as err:  # UnsafeFileError, CorruptFileError, ParamsError
            raise ValueError(f"--model {model}: {err}") from None
        except KeyError as err:
            raise ValueError(f"--model {model}: not an EMA model file (the {EMA_FILE} of the "
                             f"train stage): it has no {err}") from None


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
