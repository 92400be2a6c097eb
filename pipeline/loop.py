"""What the training loops share (pipeline/training.py's and pipeline/autoencoder_training.py's):
periodic work (`due`), stopping after a step at SIGINT or SIGTERM (`stop_requests`,
`Interrupted`), logging only steps that the logger does not hold yet (`NewStepsOnly`), and the
hash of the training images that a run's identity includes (`hash_images`); and how a training
stage ends its tracking run when the loop fails (`marked_on_failure`).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from pipeline.logger import Logger, Relay

HASH_CHUNK = 1 << 26  # bytes of images hashed at a time: a memory-mapped set is not read in whole


def hash_images(digest: Any, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Feed the images [N, ...] (uint8, in memory or memory-mapped) and labels into `digest`
    (a hashlib object), a chunk of images at a time."""
    rows = max(1, HASH_CHUNK // max(1, math.prod(images.shape[1:])))
    for start in range(0, len(images), rows):
        digest.update(np.ascontiguousarray(images[start:start + rows].numpy()))
    digest.update(labels.numpy().tobytes())


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training; a checkpoint of the last finished step was written."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint written, "
                         "`dvc repro` resumes from it")
        self.signum, self.step = signum, step


def due(step: int, every: int, last: int) -> bool:
    """Whether the periodic work done every `every` steps (and at the last step) is due now."""
    return step % every == 0 or step == last


@dataclass
class StopRequest:
    signum: int = 0  # the first SIGINT/SIGTERM received, 0 if none


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Within the block, SIGINT and SIGTERM ask the loop to stop after its current step (and
    write a checkpoint) instead of killing it mid-step; a second signal stops at once."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # handlers only work there
        yield request
        return

    def handle(signum: int, frame: object) -> None:
        if request.signum:
            raise KeyboardInterrupt
        request.signum = signum
        # os.write, not print: print is not reentrant if the signal lands inside another print.
        os.write(2, f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                    "(send it again to stop at once)\n".encode())

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class FinishingRun(Protocol):
    """What marked_on_failure needs of a tracking run (pipeline.tracking.Run)."""

    def finish(self, status: str = "FINISHED") -> None: ...


@contextmanager
def marked_on_failure(run: FinishingRun, stage: str) -> Iterator[None]:
    """A stage's work, whose failure ends `run`: KILLED by a stop after a step (`Interrupted`,
    at SIGINT or SIGTERM, with a checkpoint written), after which the stage exits with 128 + the
    signal number, as a process that the signal killed; KILLED by a second signal
    (KeyboardInterrupt); FAILED by any other exception (e.g. a diverged loss), which goes on up.
    A block that succeeds leaves the run running, for the stage to finish."""
    try:
        yield
    except Interrupted as stop:
        run.finish("KILLED")
        print(f"{stage}: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except KeyboardInterrupt:
        run.finish("KILLED")
        raise
    except BaseException:
        run.finish("FAILED")
        raise



class NewStepsOnly(Relay):
    """Passes on only what the logger does not hold yet: a run killed after its last checkpoint
    already logged the steps that the resumed run computes again (bit for bit the same)."""

    def __init__(self, logger: Logger) -> None:
        super().__init__(logger)
        self.logged: dict[str, int] = {}

    def _new(self, key: str, step: int) -> bool:
        if key not in self.logged:
            self.logged[key] = self.logger.last_step(key) or 0
        return step > self.logged[key]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._new("loss", step):
            self.logger.log_metrics(metrics, step)

    def log_image(self, image: Image.Image, key: str, step: int) -> None:
        if self._new(key, step):
            self.logger.log_image(image, key, step)
