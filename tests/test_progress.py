"""Progress: a tqdm bar on a terminal, throttled plain lines elsewhere; the training Logger."""

import io

import pytest
from PIL import Image

from pipeline.config import TrainParams
from pipeline.progress import Progress, TrainProgress, duration, progress_bar
from test_training import Recorder


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (45.4, "45s"), (80, "1m20s"),
                                               (3599, "59m59s"), (7500, "2h05m")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_plain_lines_are_throttled_and_the_last_is_always_written():
    clock, out = Clock(), io.StringIO()
    progress = Progress(1500, "train", stream=out, terminal=False, every_s=30, clock=clock)
    for step, t in [(50, 5.0), (100, 10.0), (500, 40.0), (1000, 60.0), (1500, 61.0)]:
        clock.now = t
        progress.update(step, rate=12.3, loss=0.041234)
    assert out.getvalue().splitlines() == [
        "train: step 50/1500 loss 0.04123 12.3 it/s eta 1m58s",  # 1450 / 12.3 = 117.9 s
        # 100 at 10 s: 5 s after the last line, left out
        "train: step 500/1500 loss 0.04123 12.3 it/s eta 1m21s",  # 1000 / 12.3 = 81.3 s
        # 1000 at 60 s: 20 s after the last line, left out
        "train: step 1500/1500 loss 0.04123 12.3 it/s eta 0s",
    ]


def test_rate_defaults_to_units_over_elapsed_time():
    clock, out = Clock(), io.StringIO()
    progress = Progress(100, "ddpm", stream=out, terminal=False, every_s=0, clock=clock)
    progress.update(0)  # no rate yet: no ETA either
    clock.now = 4.0
    progress.update(20)
    assert out.getvalue().splitlines() == ["ddpm: step 0/100", "ddpm: step 20/100 5 it/s eta 16s"]


def test_terminal_bar_shows_loss_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    progress = Progress(1500, "train", stream=out, terminal=True, clock=clock)
    clock.now = 40.0
    progress.update(500, rate=12.3, loss=0.0412)
    drawn = out.getvalue().split("\r")[-1]
    assert drawn.startswith("train:  33%|")
    assert drawn.rstrip().endswith("500/1500 [00:00, loss 0.0412 12.3 it/s eta 1m21s]")
    clock.now = 41.0
    progress.update(1500, rate=12.3, loss=0.03)
    assert out.getvalue().endswith("\n")  # closed at the total: the next print gets its own line
    assert "1500/1500" in out.getvalue().split("\r")[-1]


def test_progress_bar_yields_every_item_and_counts_them():
    out = io.StringIO()
    items = list(progress_bar(iter("abc"), 3, "evaluate", unit="part", stream=out,
                              terminal=False, every_s=0))
    assert items == ["a", "b", "c"]
    assert [line.split(" ")[2] for line in out.getvalue().splitlines()] == ["1/3", "2/3", "3/3"]


def test_train_progress_passes_everything_on_and_moves_the_bar():
    run, out = Recorder(), io.StringIO()
    logger = TrainProgress(run, TrainParams(steps=100, batch_size=16, warmup_steps=0),
                           stream=out, terminal=False, every_s=0)
    row = {"loss": 0.5, "lr": 1e-3, "grad_norm": 2.0, "images_per_s": 64.0, "seconds": 1.25}
    logger.log_metrics(row, 20)
    logger.log_image(Image.new("L", (3, 2)), "sample_grid", 20)
    assert run.metrics == [(20, row)] and run.images == [("sample_grid", 20, (3, 2))]
    assert logger.last_step("loss") == 20  # the training loop's resume check reaches the run
    # 64 images/s at batch 16 = 4 steps/s, 80 steps left = 20 s
    assert out.getvalue() == "train: step 20/100 loss 0.5 4 it/s eta 20s\n"
