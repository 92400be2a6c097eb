"""The training loop: schedule, learning, logging, and exact resume after an interruption."""

import dataclasses
import math
import pytest
import torch

from pipeline.config import TrainParams, from_dict
from pipeline.data import ImageSet
from pipeline.inference import generate, progression_image, write_samples
from pipeline.model_file import EMA_FILE, load_ema_model, read_model_file
from pipeline import training
from pipeline.io import UnsafeFileError, save_torch
from pipeline.logger import Logger
from pipeline.training import NonFiniteLoss, TrainState, learning_rate, save_history, summary, train

TINY = {"preprocess": {"image_size": 8, "channels": 1},
        "model": {"base_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [4],
                  "num_heads": 2, "norm_groups": 4, "dropout": 0.1, "num_classes": 0},
        "diffusion": {"num_timesteps": 50},
        "sample": {"num_steps": 4},
        "train": {"steps": 6, "batch_size": 8, "lr": 0.002, "warmup_steps": 2, "log_every": 2,
                  "checkpoint_every": 2, "sample_every": 3, "grid_images": 4,
                  "grid_sampling_steps": 3, "precision": "fp32"}}


def tiny_params(**train):
    raw = {section: dict(values) for section, values in TINY.items()}
    raw["train"].update(train)
    return from_dict(raw)


def tiny_data(n: int = 16) -> ImageSet:
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    return ImageSet(images, torch.arange(n) % 2, ("a", "b"))


class Recorder(Logger):
    """A Logger that keeps what it is given."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.metrics, self.images, self.stop_at = [], [], stop_at

    def last_step(self, key):
        steps = [s for s, m in self.metrics if key in m] + [s for k, s, _ in self.images if k == key]
        return max(steps, default=None)

    def log_metrics(self, metrics, step):
        if step == self.stop_at:
            raise KeyboardInterrupt  # as if the process died here, before this step was logged
        self.metrics.append((step, metrics))

    def log_image(self, image, key, step):
        self.images.append((key, step, image.size))


def test_learning_rate_warmup_then_cosine():
    p = TrainParams(steps=110, lr=1.0, warmup_steps=10)
    assert learning_rate(0, p) == pytest.approx(0.1)
    assert learning_rate(9, p) == pytest.approx(1.0)
    assert learning_rate(10, p) == pytest.approx(1.0)
    assert learning_rate(60, p) == pytest.approx(0.5)  # half-way through the cosine
    assert learning_rate(35, p) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(109, p) < 1e-3


def test_train_logs_curves_grids_and_writes_the_ema_model(tmp_path):
    logger = Recorder()
    state = train(tiny_params(), tiny_data(), tmp_path, logger, run_id="run-1")
    assert state.step == 6 and [s for s, _ in logger.metrics] == [2, 4, 6]
    assert set(logger.metrics[0][1]) == {"loss", "lr", "grad_norm", "images_per_s", "seconds"}
    assert all(math.isfinite(v) for _, m in logger.metrics for v in m.values())
    # grids at every sample_every steps and at the end; 4 images of 8 px with 2 px frames
    assert logger.images == [("sample_grid", 3, (22, 22)), ("sample_grid", 6, (22, 22))]
    trained = load_ema_model(tmp_path / EMA_FILE, torch.device("cpu"))
    assert trained.run_id == "run-1" and trained.step == 6 and trained.classes == ("a", "b")
    assert trained.scheduler.num_timesteps == 50


def test_interrupted_training_resumes_exactly(tmp_path):
    """Ctrl-C at step 4 before its checkpoint (the last is at 2), then a restart: the same
    weights, bit for bit, as one uninterrupted run."""
    params, data = tiny_params(), tiny_data()
    train(params, data, tmp_path / "clean", Recorder())
    with pytest.raises(KeyboardInterrupt):
        train(params, data, tmp_path / "resumed", Recorder(stop_at=4))
    logger = Recorder()
    state = train(params, data, tmp_path / "resumed", logger)
    assert [s for s, _ in logger.metrics] == [4, 6]  # it went on from step 2
    assert [row["step"] for row in state.history] == [2, 4, 6]
    clean = read_model_file(tmp_path / "clean" / EMA_FILE).weights
    resumed = read_model_file(tmp_path / "resumed" / EMA_FILE).weights
    assert clean.keys() == resumed.keys()
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)


@pytest.mark.parametrize("change", ["model", "data"])
def test_checkpoint_of_other_params_or_data_is_not_resumed(tmp_path, capsys, change):
    train(tiny_params(), tiny_data(), tmp_path, Recorder())
    capsys.readouterr()
    params = tiny_params()
    if change == "model":  # another width: loading the old weights would be wrong
        params = from_dict({**TINY, "model": {**TINY["model"], "base_channels": 16}})
    data = tiny_data(17) if change == "data" else tiny_data()
    logger = Recorder()
    state = train(params, data, tmp_path, logger)
    assert "resuming" not in capsys.readouterr().out
    assert [s for s, _ in logger.metrics] == [2, 4, 6]  # started again from step 0
    assert len(list((tmp_path / "checkpoints").iterdir())) == 2  # the other run's folder is kept
    assert state.step == 6


def test_training_learns_a_single_image(tmp_path):
    """Fitting one image, the plain loss falls from the untrained E[eps^2] = 1 (zero-initialised
    output) to a small fraction of it."""
    params = tiny_params(steps=150, lr=0.005, log_every=10, sample_every=1000,
                         checkpoint_every=1000, warmup_steps=5, min_snr_gamma=0.0)
    data = ImageSet(torch.full((1, 1, 8, 8), 200, dtype=torch.uint8), torch.zeros(1).long(), ("x",))
    logger = Recorder()
    train(params, data, tmp_path, logger)
    first, last = logger.metrics[0][1]["loss"], logger.metrics[-1][1]["loss"]
    assert first > 0.6 and last < 0.1


def test_history_csv_and_summary(tmp_path):
    history = [{"step": 2, "loss": 1.0, "lr": 0.1, "grad_norm": 2.0, "images_per_s": 10.0,
                "seconds": 1.0},
               {"step": 4, "loss": 0.5, "lr": 0.2, "grad_norm": 1.0, "images_per_s": 30.0,
                "seconds": 1.0}]
    save_history(tmp_path / "h.csv", history)
    assert (tmp_path / "h.csv").read_text().splitlines() == [
        "step,loss,lr,grad_norm,images_per_s", "2,1,0.1,2,10", "4,0.5,0.2,1,30"]
    result = summary(TrainState(step=4, history=history, seconds=2.0), 123)
    assert result == {"steps": 4, "final_loss": 0.5, "train_seconds": 2.0, "images_per_s": 20.0,
                      "parameters": 123}


def test_generate_is_seeded_and_writes_pngs(tmp_path):
    train(tiny_params(), tiny_data(), tmp_path, Recorder())
    trained = load_ema_model(tmp_path / EMA_FILE, torch.device("cpu"))
    p = from_dict({"sample": {"num_images": 5, "batch_size": 2, "num_steps": 4},
                   "evaluate": {"kid_subset_size": 5}}).sample
    images, steps = generate(trained, p, return_intermediates=True)
    again, _ = generate(trained, p)
    assert images.shape == (5, 1, 8, 8) and images.dtype == torch.uint8
    assert torch.equal(images, again) and len(steps) == 4 and steps[0].shape == (2, 1, 8, 8)
    write_samples(images, tmp_path / "samples")
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == \
        [f"{i:05d}.png" for i in range(5)]
    assert progression_image(steps, rows=2).size == (2 + 4 * 10, 2 + 2 * 10)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    save_torch({"v": 1}, tmp_path / "f.pt")
    with pytest.raises(AttributeError):
        save_torch({"v": lambda: None}, tmp_path / "f.pt")  # lambdas cannot be pickled
    assert torch.load(tmp_path / "f.pt")["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["f.pt"]  # no temporary file left behind


def test_equal_objects_saved_atomically_give_equal_bytes(tmp_path):
    obj = {"weights": torch.arange(6.0).reshape(2, 3), "step": 3}
    save_torch(obj, tmp_path / "a.pt")
    save_torch(obj, tmp_path / "b.pt")  # another temporary name on the way
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "b.pt")["weights"], obj["weights"])


def ema_weights(folder):
    return read_model_file(folder / EMA_FILE).weights


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stop_at", [4, 6])
def test_resume_mid_interval_logs_the_same_loss_curve(tmp_path, stop_at):
    """A checkpoint at step 3 splits the log interval 3-4. Killed before logging step 4, the
    resumed run must average the same steps (3 and 4); killed before logging step 6, it must not
    log step 4 again. Either way the logged curve equals the uninterrupted one exactly."""
    params, data = tiny_params(checkpoint_every=3), tiny_data()
    clean = Recorder()
    train(params, data, tmp_path / "clean", clean)
    logger = Recorder(stop_at=stop_at)  # one store, as the MLflow run is: it keeps what was logged
    with pytest.raises(KeyboardInterrupt):
        train(params, data, tmp_path / "resumed", logger)
    logger.stop_at = None
    train(params, data, tmp_path / "resumed", logger)
    assert [(s, m["loss"], m["grad_norm"], m["lr"]) for s, m in logger.metrics] == \
        [(s, m["loss"], m["grad_norm"], m["lr"]) for s, m in clean.metrics]
    assert logger.images == clean.images
    assert_same_weights(ema_weights(tmp_path / "clean"), ema_weights(tmp_path / "resumed"))


def test_only_the_newest_two_checkpoints_of_a_run_are_kept(tmp_path):
    train(tiny_params(), tiny_data(), tmp_path, Recorder())
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*/*.pt"))
    assert [n.split("-")[1] for n in names] == ["00000004", "00000006"]
    train(tiny_params(lr=0.001), tiny_data(), tmp_path, Recorder())  # another run: its own folder
    folders = sorted((tmp_path / "checkpoints").iterdir(), key=lambda f: f.stat().st_mtime)
    newer = sorted(p.name for p in folders[1].glob("*.pt"))
    assert len(folders) == 2 and sorted(p.name for p in folders[0].glob("*.pt")) == names
    assert len(newer) == 2 and not set(newer) & set(names)


def test_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    params, data = tiny_params(), tiny_data()
    train(params, data, tmp_path / "clean", Recorder())
    with pytest.raises(KeyboardInterrupt):  # checkpoints at 2 and 4, stopped while logging 6
        train(params, data, tmp_path / "run", Recorder(stop_at=6))
    newest = max((tmp_path / "run" / "checkpoints").glob("*/*.pt"))
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short, as by a lying disk
    logger = Recorder()
    train(params, data, tmp_path / "run", logger)
    out = capsys.readouterr().out
    assert f"{newest}: not a readable tensor file" in out and "falling back" in out
    assert "resuming at step 2" in out and [s for s, _ in logger.metrics] == [4, 6]
    assert_same_weights(ema_weights(tmp_path / "clean"), ema_weights(tmp_path / "run"))


class RunsCode:
    """Pickles into a call of os.system: what a crafted checkpoint would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    params, data = tiny_params(), tiny_data()
    train(params, data, tmp_path, Recorder())
    marker = tmp_path / "pwned"
    newest = max((tmp_path / "checkpoints").glob("*/*.pt"))
    torch.save({"identity": "x", "state": RunsCode(marker)}, newest)
    with pytest.raises(UnsafeFileError, match=r"refused to load.*could run arbitrary code"):
        train(params, data, tmp_path, Recorder())
    assert not marker.exists()
    torch.load(newest, weights_only=False)  # the payload is real: loading it unsafely runs it
    assert marker.exists()


def test_non_finite_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    params, data = tiny_params(), tiny_data()
    real_step = training.train_step
    calls = []

    def diverging(*args, **kwargs):
        calls.append(1)
        loss, norm = real_step(*args, **kwargs)
        return (math.nan if len(calls) == 5 else loss), norm

    monkeypatch.setattr(training, "train_step", diverging)
    logger = Recorder()
    with pytest.raises(NonFiniteLoss, match=r"diverged at step 5: loss nan.*train\.lr = 0\.002"
                       r".*train\.grad_clip.*step-00000004-\w+\.pt, is kept"):
        train(params, data, tmp_path, logger)
    assert [p.name.split("-")[1] for p in sorted((tmp_path / "checkpoints").glob("*/*.pt"))] == \
        ["00000002", "00000004"]
    assert [s for s, _ in logger.metrics] == [2, 4] and not (tmp_path / EMA_FILE).exists()
    monkeypatch.setattr(training, "train_step", real_step)  # fixed: the run resumes from step 4
    logger = Recorder()
    train(params, data, tmp_path, logger)
    assert [s for s, _ in logger.metrics] == [6]


def test_same_params_and_seed_give_identical_samples_and_metrics(tmp_path):
    """Determinism on the CPU: two whole runs (train, sample, classifier, metrics) from the same
    params and seed agree bit for bit, and another seed gives other samples."""
    from pipeline.classifier import predict, save_classifier, train_classifier
    from pipeline.config import ClassifierParams
    from pipeline.metrics import domain_metrics

    params, data = tiny_params(), tiny_data(32)
    sample_params = from_dict({"sample": {"num_images": 12, "batch_size": 6, "num_steps": 4},
                               "evaluate": {"kid_subset_size": 5}}).sample
    outcomes = []
    for run in ("first", "second"):
        train(params, data, tmp_path / run, Recorder())
        images, _ = generate(load_ema_model(tmp_path / run / EMA_FILE, torch.device("cpu")),
                             sample_params)
        classifier = train_classifier(data, ClassifierParams(epochs=1, batch_size=8, feature_dim=8))
        save_classifier(classifier, tmp_path / run / "classifier.pt")
        metrics = domain_metrics(images, predict(classifier, images), data.images, data.images,
                                 data.labels, data.classes, tmp_path / run / "classifier.pt",
                                 kid_subset_size=5, batch_size=8, seed=0)
        outcomes.append((images, metrics))
    (first, first_metrics), (second, second_metrics) = outcomes
    assert torch.equal(first, second)
    assert first_metrics == second_metrics and math.isfinite(first_metrics["classifier_fd"])
    other, _ = generate(load_ema_model(tmp_path / "first" / EMA_FILE, torch.device("cpu")),
                        dataclasses.replace(sample_params, seed=1))
    assert not torch.equal(first, other)


@pytest.mark.slow  # torch.compile's first step compiles C++ kernels: 30-90 s on 2 cores
def test_compiled_training_follows_the_eager_run_and_saves_a_plain_model(tmp_path, monkeypatch):
    """train.compile changes how the steps run, not what they compute: the loss curve and the
    weights match the eager run's up to float rounding, and the saved weights load into a plain
    UNet."""
    # Compiled dropout draws its masks from its own generator unless told to use eager's.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    params, data = tiny_params(), tiny_data()
    eager, compiled = Recorder(), Recorder()
    train(params, data, tmp_path / "eager", eager)
    torch._dynamo.utils.counters.clear()
    train(tiny_params(compile=True), data, tmp_path / "compiled", compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    losses = [[m["loss"] for _, m in logger.metrics] for logger in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    a, b = ema_weights(tmp_path / "eager"), ema_weights(tmp_path / "compiled")
    assert a.keys() == b.keys()  # no "_orig_mod." prefixes from the compiled wrapper
    # Adam divides by the gradient's own scale, so rounding in a near-zero gradient moves a weight
    # by up to 1e-5 per step here; a step computed wrongly moves it by about lr = 2e-3.
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    load_ema_model(tmp_path / "compiled" / EMA_FILE, torch.device("cpu"))


def test_a_finished_run_removes_the_folders_of_other_finished_runs_only(tmp_path):
    from pipeline.checkpoint import Checkpoints

    def run(identity, step=2):
        checkpoints = Checkpoints(tmp_path, identity * 16)
        checkpoints.save({"state": {"step": step}}, step)
        return checkpoints

    finished, interrupted, resumed = run("a"), run("b"), run("c")
    finished.complete()
    resumed.complete()  # finished once ...
    assert resumed.load()["state"]["step"] == 2  # ... and started again: running, not finished
    run("d").complete()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b" * 16, "c" * 16, "d" * 16]
    assert interrupted.newest() == tmp_path / ("b" * 16) / f"step-00000002-{'b' * 16}.pt"


def test_a_finished_run_is_handed_back_under_its_own_code_only(tmp_path, capsys):
    from pipeline.checkpoint import COMPLETE, Checkpoints

    def finished(code, identity="a"):
        checkpoints = Checkpoints(tmp_path, identity * 64, code)
        checkpoints.save({"state": {"step": 2}}, 2)
        checkpoints.set_run_id(f"run-{identity}")
        checkpoints.complete()
        return checkpoints

    finished("code 1").drop_if_made_by_other_code()  # the same code: kept
    again = Checkpoints(tmp_path, "a" * 64, "code 1")
    assert again.run_id() == "run-a" and again.load()["state"]["step"] == 2
    finished("code 1")
    other = Checkpoints(tmp_path, "a" * 64, "code 2")
    other.drop_if_made_by_other_code()
    assert not other.folder.exists() and other.run_id() is None and other.load() is None
    assert "a finished run of other code" in capsys.readouterr().out
    old = finished("code 1", "b")  # a mark written before marks named their code
    (old.folder / COMPLETE).write_text('{"identity": "%s"}' % ("b" * 64))
    Checkpoints(tmp_path, "b" * 64, "code 1").drop_if_made_by_other_code()
    assert not old.folder.exists()


def test_an_interrupted_run_resumes_under_other_code_and_says_so(tmp_path, capsys):
    from pipeline.checkpoint import Checkpoints

    Checkpoints(tmp_path, "a" * 64, "code 1").save({"state": {"step": 2}}, 2)
    resumed = Checkpoints(tmp_path, "a" * 64, "code 2")
    resumed.drop_if_made_by_other_code()  # not finished: nothing is dropped
    assert resumed.load()["state"]["step"] == 2
    assert "began under other code" in capsys.readouterr().out
    assert Checkpoints(tmp_path, "a" * 64, "code 1").load()["state"]["step"] == 2
    assert "other code" not in capsys.readouterr().out
