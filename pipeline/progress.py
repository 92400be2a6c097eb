"""Progress of training, sampling and evaluation: a tqdm bar on a terminal, plain lines elsewhere.

When stderr is a terminal, `Progress` draws a tqdm bar with the rate, the ETA and values such as
the loss. When it is not (CI, `dvc repro > log`, DVC's queue workers), a bar's carriage-return
redraws would pile up as one unreadable line, so it writes plain lines instead, at most one every
`every_s` seconds plus the last one:

    train: step 500/1500 loss 0.0412 12.3 it/s eta 1m20s

`TrainProgress` is a `pipeline.logger.Relay` that passes everything on to the real logger and
moves the bar at each `log_metrics` call; `progress_bar` wraps an iterable like tqdm does.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

from pipeline.config import TrainParams
from pipeline.logger import Logger, Relay

T = TypeVar("T")
EVERY_S = 30.0  # plain lines: a CI log gets a line per half minute, not one per step
TERMINAL_EVERY_S = 0.1  # a bar redraws at most this often (tqdm's own default)


def duration(seconds: float) -> str:
    """A short human duration: 45s, 1m20s, 2h05m."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """`total` units of work, reported as a tqdm bar on a terminal or as plain lines.

    `update(n, rate, **values)` sets the position to n. The rate (units per second) defaults to
    n over the time since this object was made; a caller that knows better (training measures
    its own throughput, also across a resume) passes it. Values print as `name value`, 4
    significant digits.
    """

    def __init__(self, total: int, desc: str, unit: str = "step", *, stream: TextIO | None = None,
                 terminal: bool | None = None, every_s: float = EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        terminal = self.stream.isatty() if terminal is None else terminal
        self.clock, self.every_s = clock, every_s if not terminal else TERMINAL_EVERY_S
        self.start = clock()
        self.drawn: float | None = None  # when the bar or the last line was drawn
        # The bar shows this object's rate and ETA (in the postfix), not tqdm's own estimate,
        # which a resumed training's jump from step 0 to its checkpoint would spoil.
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                   "[{elapsed}{postfix}]") if terminal else None

    def status(self, n: int, rate: float | None, values: dict[str, float]) -> str:
        """`loss 0.0412 12.3 it/s eta 1m20s`: the values, the rate and the time left."""
        if rate is None:
            elapsed = self.clock() - self.start
            rate = n / elapsed if elapsed > 0 and n > 0 else None
        parts = [f"{name} {value:.4g}" for name, value in values.items()]
        if rate:
            parts += [f"{rate:.3g} it/s", f"eta {duration((self.total - n) / rate)}"]
        return " ".join(parts)

    def update(self, n: int, rate: float | None = None, **values: float) -> None:
        """Move to n. Drawn at most every `every_s` seconds (a bar: every 0.1 s), and at the end."""
        now = self.clock()
        if n < self.total and self.drawn is not None and now - self.drawn < self.every_s:
            return
        self.drawn = now
        status = self.status(n, rate, values)
        if self.bar is None:
            self.stream.write(f"{self.desc}: {self.unit} {n}/{self.total} {status}".rstrip() + "\n")
            self.stream.flush()
            return
        self.bar.n = n
        self.bar.set_postfix_str(status, refresh=False)  # tqdm puts ", " before it
        self.bar.refresh()
        if n >= self.total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(items: Iterable[T], total: int, desc: str, unit: str = "step",
                 **kwargs) -> Iterator[T]:
    """`items`, with a Progress moved on after each one (like `tqdm(items)`)."""
    progress = Progress(total, desc, unit, **kwargs)
    try:
        for n, item in enumerate(items, start=1):
            yield item
            progress.update(n)
    finally:
        progress.close()


class TrainProgress(Relay):
    """The training loop's Logger: passes everything on to `logger`, and moves a progress bar
    to each logged step, with the interval's mean loss, its steps per second and the ETA.

    The rate comes from the row's `images_per_s` (the loop's own measurement over the interval,
    pipeline.training.Window), so it stays right when a resumed run starts at its checkpoint.
    """

    def __init__(self, logger: Logger, p: TrainParams, **kwargs) -> None:
        super().__init__(logger)
        self.batch_size = p.batch_size
        self.progress = Progress(p.steps, "train", **kwargs)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logger.log_metrics(metrics, step)
        self.progress.update(step, metrics["images_per_s"] / self.batch_size,
                             loss=metrics["loss"])
