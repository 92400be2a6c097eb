"""Training batches, streamed: gathered from the training images (in memory or memory-mapped) by
seeded indices, prepared ahead by a background thread, and copied to the device asynchronously.

The images of step s are drawn with replacement by a generator of their own, seeded by
(train.seed, s) (`batch_indices`). A batch is then a function of its step alone: the thread can
gather batches ahead of the loop, and a resumed run draws from its step on what the
uninterrupted run drew, with no state to keep in a checkpoint. Only a batch's rows are read
(indexing a memory-mapped set reads only their pages), and under data-parallel training only
this rank's shard of them: every rank draws the whole batch's indices and gathers its part
(pipeline/distributed.py). The labels, loaded in full, are the whole batch's, since the random
draws of a step cover the whole batch (pipeline/training.py's train_step). For a GPU the rows
are pinned, so that the copy runs asynchronously; the conversion to the model's range runs on
the device, which holds a batch, not the data set.
"""

from __future__ import annotations

import contextlib
import queue
import threading

import numpy as np
import torch

from pipeline.config import TrainParams
from pipeline.data import ImageSet, to_model_range

DEPTH = 2  # batches gathered ahead: one to hide the next gather behind a step, one spare
Rows = tuple[torch.Tensor, torch.Tensor | None]  # a batch's images (uint8 or latents), labels


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> torch.Tensor:
    """The indices of step `step`'s batch of `batch_size` out of `n` images, with replacement.

    numpy's SeedSequence hashes (seed, step) into independent streams, its documented way of
    seeding parallel streams; a negative seed counts as its 64-bit two's complement, as
    torch.manual_seed takes it."""
    generator = np.random.default_rng([seed % 2**64, step])
    return torch.from_numpy(generator.integers(n, size=batch_size))


def gather(data: ImageSet, step: int, p: TrainParams, shard: slice, labels: bool,
           device: torch.device) -> Rows:
    """The rows of this rank's `shard` of step's batch, and the whole batch's labels if
    `labels`, on the CPU; pinned for a CUDA `device`."""
    index = batch_indices(p.seed, step, p.batch_size, len(data))
    rows = (data.images[index[shard]], data.labels[index] if labels else None)
    if device.type != "cuda":
        return rows
    return rows[0].pin_memory(), None if rows[1] is None else rows[1].pin_memory()


def to_device(rows: Rows, device: torch.device) -> Rows:
    """The images in the model's range and the labels on `device`: a copy that does not wait
    for the device (from pinned memory), then the conversion there. A latent set's float32
    latents are the model's input as they are."""
    images, labels = (None if r is None else r.to(device, non_blocking=True) for r in rows)
    return (to_model_range(images) if images.dtype == torch.uint8 else images), labels


class Batches:
    """The batches of the training `steps` on `device`, `next(batches)` for each step in turn.

    A background thread gathers them up to DEPTH ahead; leaving the `with` block stops it,
    also on an exception or an interruption. An error in the thread is raised by `next`.
    """

    def __init__(self, data: ImageSet, p: TrainParams, shard: slice, labels: bool,
                 device: torch.device, steps: range) -> None:
        self.device = device
        self.queue: queue.Queue[Rows | BaseException] = queue.Queue(DEPTH)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._fill, name="batches", daemon=True,
                                       args=(data, p, shard, labels, steps))

    def __enter__(self) -> Batches:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        while self.thread.is_alive():  # a full queue blocks the thread's put: make room
            with contextlib.suppress(queue.Empty):
                self.queue.get_nowait()
            self.thread.join(0.01)

    def __next__(self) -> Rows:
        rows = self.queue.get()
        if isinstance(rows, BaseException):
            raise rows
        return to_device(rows, self.device)

    def _fill(self, data: ImageSet, p: TrainParams, shard: slice, labels: bool,
              steps: range) -> None:
        for step in steps:
            if self.stopping.is_set():
                return
            try:
                self.queue.put(gather(data, step, p, shard, labels, self.device))
            except BaseException as err:  # noqa: BLE001 - handed on to the training loop
                self.queue.put(err)
                return
