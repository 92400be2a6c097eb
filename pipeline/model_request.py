"""The MLflow model's input (pipeline/mlflow_model.py): a table with one row per request.

Its columns are those of `example_request`, with the meanings of the sample.* params they name;
`num_images` is the request's image count and `classes` is comma-separated ("" = all classes).
"""

from __future__ import annotations

from typing import Any

from pipeline.config import SampleParams, sample_params
from pipeline.edm import EDM
from pipeline.model_file import TrainedModel


def split_names(text: str) -> list[str]:
    """Class names from a comma-separated list: "3, 7" -> ["3", "7"]; "" -> [] (all classes)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def example_request(trained: TrainedModel) -> dict[str, Any]:
    """A request for 4 images with DDIM, or Heun for an EDM model (13 steps: 25 evaluations, as
    DDIM's 25): the input example the model is logged with."""
    if isinstance(trained.scheduler, EDM):
        method, num_steps = "heun", 13
    else:
        method, num_steps = "ddim", min(25, trained.scheduler.num_timesteps)
    return {"num_images": 4, "seed": 0, "method": method, "num_steps": num_steps, "eta": 0.0,
            "guidance_scale": 0.0, "classes": ""}


def request_params(request: dict[str, Any]) -> tuple[SampleParams, int]:
    """The sampling params and the image count of one request (a row like example_request's)."""
    options = dict(request)
    num_images = options.pop("num_images")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images = {num_images!r} must be a positive integer")
    options["classes"] = split_names(options.get("classes") or "")
    return sample_params(options), num_images
