"""Where training writes its curves, sample grids and resolved settings: the `Logger` interface, at the bottom.

The training loop (pipeline/training.py) writes to a Logger and never touches MLflow;
pipeline/tracking.py's run is the MLflow one. `Logger` itself records nothing: it is the null
object for a run that is not tracked (and for the data-parallel ranks that do not log).
`Relay` passes everything on to another logger; its subclasses change what they need
(pipeline.progress.TrainProgress moves a progress bar, pipeline.training.NewStepsOnly drops
steps already logged).
"""

from __future__ import annotations

from typing import Any

from PIL import Image


class Logger:
    """Metrics and image series by training step. This base records nothing."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, image: Image.Image, key: str, step: int) -> None:
        pass

    def last_step(self, key: str) -> int | None:
        """The last step logged under `key` (a metric or an image series), None if none."""
        return None

    def log_params(self, params: dict[str, Any]) -> None:
        """Settings of the run, each logged once (a tracking param cannot change its value)."""

    def param(self, key: str) -> str | None:
        """The value logged for param `key`, None if none."""
        return None


class Relay(Logger):
    """Passes everything on to `logger`."""

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logger.log_metrics(metrics, step)

    def log_image(self, image: Image.Image, key: str, step: int) -> None:
        self.logger.log_image(image, key, step)

    def last_step(self, key: str) -> int | None:
        return self.logger.last_step(key)

    def log_params(self, params: dict[str, Any]) -> None:
        self.logger.log_params(params)

    def param(self, key: str) -> str | None:
        return self.logger.param(key)
