"""The export to diffusers (docs/generate.md): a trained model as a diffusers DDPMPipeline folder.

    python -m pipeline.export --model models:/simple-diffusion/latest --out exported/

MODEL is what the generate CLI takes (pipeline.generate.open_model reads it): a registered model,
a run's logged model or a local ema.safetensors. The folder holds model_index.json, unet/ (a
UNet2DModel config and its weights as safetensors), scheduler/ (the DDPMScheduler config: the
schedule, prediction type, timesteps, clipping, variance and timestep spacing) and README.md, a
model card. pipeline/diffusers_map.py is the mapping; a model that UNet2DModel cannot express is
refused, naming the param. The folder is written beside --out and renamed into place.

diffusers is not a main dependency: it is in the `bench` group (`uv sync --group bench`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import SampleParams, TimestepSpacing, TrackingParams, VarianceType, choices
from pipeline.diffusers_map import scheduler_config, unet_config, unet_state_dict, unexpressible
from pipeline.generate import OneLineParser, add_model_argument, open_model
from pipeline.io import atomic_folder
from pipeline.model_file import ModelFile, read_model_file

INSTALL = "diffusers is not installed; it is in the bench group: uv sync --group bench"


def parser() -> argparse.ArgumentParser:
    defaults = SampleParams()
    p = OneLineParser(prog="python -m pipeline.export",
                      description="Export a trained simple-diffusion model to a diffusers folder.")
    add_model_argument(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="the folder to write; it must not exist yet (or be empty)")
    # The DDPM sampler's sample.* params, which the model file does not hold: the scheduler's.
    p.add_argument("--timestep-spacing", choices=choices(TimestepSpacing),
                   default=defaults.timestep_spacing,
                   help=f"the scheduler's timestep spacing ({defaults.timestep_spacing})")
    p.add_argument("--variance-type", choices=choices(VarianceType),
                   default=defaults.variance_type,
                   help=f"the DDPM reverse-step variance ({defaults.variance_type})")
    p.add_argument("--clip-sample", action=argparse.BooleanOptionalAction,
                   default=defaults.clip_sample,
                   help=f"clip x0 to [-1, 1] at every step ({defaults.clip_sample})")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow store of models:/ and runs:/ URIs, and of the run's metrics "
                        "(MLFLOW_TRACKING_URI, else the project's mlflow.db)")
    return p


def run_cli(args: argparse.Namespace) -> None:
    check_out(args.out)
    try:
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    except ImportError:
        raise ValueError(INSTALL) from None
    saved = open_model(args.model, args.tracking_uri, read_model_file)
    problem = unexpressible(saved.params)
    if problem:
        raise ValueError(f"--model {args.model}: diffusers cannot express this model: {problem}")
    sample = dataclasses.replace(SampleParams(), timestep_spacing=args.timestep_spacing,
                                 variance_type=args.variance_type, clip_sample=args.clip_sample)
    unet = UNet2DModel(**unet_config(saved.params))
    unet.load_state_dict(unet_state_dict(saved.weights, saved.params))  # strict: every weight
    scheduler = DDPMScheduler(**scheduler_config(saved.params.diffusion, sample))
    metrics = run_metrics(saved.run_id, args.tracking_uri)
    with atomic_folder(args.out) as folder:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder,
                                                                     safe_serialization=True)
        (folder / "README.md").write_text(model_card(saved, args.model, metrics))
    print(f"export: {args.model} -> {args.out} (diffusers DDPMPipeline)")


def check_out(out: Path) -> None:
    """Before any work: --out must be a new (or empty) folder."""
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ValueError(f"--out {out}: exists; remove it or name a new folder")


def run_metrics(run_id: str | None, uri: str | None) -> dict[str, float]:
    """The last value of every metric of the training run, or {} where the run is not known."""
    if run_id is None:
        return {}
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from pipeline.tracking import check_readable, quiet_mlflow, tracking_uri

    uri = uri or tracking_uri(TrackingParams())
    try:
        check_readable(uri)  # an absent SQLite store would be created empty
        with quiet_mlflow():
            return dict(MlflowClient(uri).get_run(run_id).data.metrics)
    except (ValueError, MlflowException):  # another store, or none: the card says so
        return {}


def model_card(saved: ModelFile, source: str, metrics: dict[str, float]) -> str:
    """README.md of the folder: what the model was trained on, its run, its metrics, how to load."""
    p = saved.params
    size, channels, classes = p.preprocess.image_size, p.preprocess.channels, saved.classes
    names = ", ".join(classes) if classes else "none recorded"
    conditional = p.model.num_classes > 0
    lines = [
        "---", "library_name: diffusers",
        f"tags: [ddpm, simple-diffusion, {'class-conditional' if conditional else 'unconditional'}"
        "-image-generation]",
        "---", "", "# A simple-diffusion DDPM, exported to diffusers", "",
        f"Trained by simple-diffusion for {saved.step} steps on "
        f"{size}x{size} images with {channels} channel{'s' if channels > 1 else ''}, of the "
        f"classes {names}. "
        + (f"Class-conditional: labels 0 to {p.model.num_classes - 1} are the classes in this "
           f"order, label {p.model.num_classes} is the null class of classifier-free guidance."
           if conditional else "Unconditional: it draws all classes."),
        "",
        f"- exported from: `{source}`",
        f"- MLflow run: `{saved.run_id}`" if saved.run_id else "- MLflow run: none (untracked)",
        f"- noise schedule: {p.diffusion.schedule}, {p.diffusion.num_timesteps} timesteps, "
        f"prediction type {p.diffusion.prediction_type}"
        + (", zero terminal SNR" if p.diffusion.rescale_zero_terminal_snr else ""),
        f"- UNet: {json.dumps(dataclasses.asdict(p.model))}", "", "## Metrics", "",
    ]
    if metrics:
        lines += ["Of the MLflow run, the last value of each:", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| `{key}` | {value:.6g} |" for key, value in sorted(metrics.items())]
    else:
        lines += ["Not known here: the MLflow run was not found in the store the export read."]
    steps = min(SampleParams().num_steps, p.diffusion.num_timesteps)
    lines += ["", "## Loading", "", "```python", *loading_example(conditional, size, steps), "```",
              ""]
    return "\n".join(lines)


def loading_example(conditional: bool, size: int, steps: int) -> list[str]:
    """The Python lines that sample 16 images from the folder in `steps` steps, for the card."""
    if not conditional:
        return ["import torch",
                "from diffusers import DDPMPipeline",
                'pipe = DDPMPipeline.from_pretrained("PATH/TO/THIS/FOLDER")',
                f"images = pipe(batch_size=16, num_inference_steps={steps},",
                "              generator=torch.Generator().manual_seed(0)).images  # PIL images"]
    # DDPMPipeline passes no class labels: the loop it runs, with them.
    return ["import torch",
            "from diffusers import DDPMScheduler, UNet2DModel",
            'unet = UNet2DModel.from_pretrained("PATH/TO/THIS/FOLDER", subfolder="unet")',
            'scheduler = DDPMScheduler.from_pretrained("PATH/TO/THIS/FOLDER",',
            '                                          subfolder="scheduler")',
            f"scheduler.set_timesteps({steps})",
            "generator = torch.Generator().manual_seed(0)",
            "labels = torch.zeros(16, dtype=torch.long)  # 16 images of the first class",
            f"x = torch.randn(16, unet.config.in_channels, {size}, {size}, generator=generator)",
            "with torch.no_grad():",
            "    for t in scheduler.timesteps:",
            "        output = unet(x, t, class_labels=labels).sample",
            "        x = scheduler.step(output, t, x, generator=generator).prev_sample",
            "images = (x / 2 + 0.5).clamp(0, 1)  # [16, C, H, W] in [0, 1]"]


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        run_cli(args)
    except ValueError as err:  # bad options, models, files and stores: one line, no traceback
        sys.exit(f"export: error: {err}")


if __name__ == "__main__":
    main()
