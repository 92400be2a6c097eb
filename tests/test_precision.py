"""Precision chosen by measurement: the probe, and how training and sampling use it."""

import dataclasses
import time

import pytest
import torch

from pipeline import training
from pipeline.config import ParamsError, from_dict
from pipeline.device import fastest_precision
from pipeline.inference import generate
from pipeline.model_file import EMA_FILE, load_ema_model, read_model_file
from pipeline.training import PRECISION_PARAM, train
from test_training import TINY, Recorder, tiny_data, tiny_params


def test_the_probe_picks_the_faster_step():
    def bf16_slow(bf16):
        time.sleep(0.02 if bf16 else 0.002)

    assert fastest_precision(bf16_slow)[0] == "fp32"
    fastest, times = fastest_precision(lambda bf16: bf16_slow(not bf16))
    assert fastest == "bf16" and times["fp32"] > times["bf16"] >= 0.002


def counting_step(fp32_s, bf16_s):
    calls = {"fp32": 0, "bf16": 0}

    def step(bf16):
        calls["bf16" if bf16 else "fp32"] += 1
        time.sleep(bf16_s if bf16 else fp32_s)
    return step, calls


def test_a_gap_over_the_decisive_factor_ends_the_probe_after_one_timed_round():
    step, calls = counting_step(0.002, 0.03)  # 15x, as bf16 on a CPU without AVX-512
    assert fastest_precision(step, repeats=3)[0] == "fp32"
    assert calls == {"fp32": 2, "bf16": 2}  # the warm-up and one timed call each
    step, calls = counting_step(0.02, 0.025)  # 1.25x: every round is run
    assert fastest_precision(step, repeats=3)[0] == "fp32"
    assert calls == {"fp32": 4, "bf16": 4}


def test_the_probe_puts_the_random_state_back():
    before = torch.get_rng_state()
    fastest_precision(lambda bf16: torch.rand(10))
    assert torch.equal(torch.get_rng_state(), before)


def ema_weights(folder):
    return read_model_file(folder / EMA_FILE).weights


def test_auto_trains_as_the_chosen_precision_would_without_the_probe(tmp_path, capsys):
    """The probe runs on a copy, with its own draws: the run's weights are bit for bit those of
    a run told the chosen precision (the tiny model has dropout, so stray draws would show)."""
    logger = Recorder()
    state = train(tiny_params(precision="auto"), tiny_data(), tmp_path / "auto", logger)
    assert state.precision in ("fp32", "bf16")
    assert f"train: precision auto -> {state.precision} (probe: fp32 " in capsys.readouterr().out
    train(tiny_params(precision=state.precision), tiny_data(), tmp_path / "fixed", Recorder())
    auto, fixed = ema_weights(tmp_path / "auto"), ema_weights(tmp_path / "fixed")
    assert all(torch.equal(auto[k], fixed[k]) for k in auto)


class ParamRecorder(Recorder):
    """A Recorder that also keeps params, as an MLflow run does."""

    def __init__(self, params=None, **kwargs):
        super().__init__(**kwargs)
        self.params = dict(params or {})

    def log_params(self, params):
        assert not set(params) & set(self.params), "a param logged twice"
        self.params.update(params)

    def param(self, key):
        return self.params.get(key)


def test_a_resumed_auto_run_keeps_its_checkpoints_precision(tmp_path, monkeypatch):
    params, data = tiny_params(precision="auto"), tiny_data()
    first = ParamRecorder(stop_at=4)
    with pytest.raises(KeyboardInterrupt):
        train(params, data, tmp_path, first)
    chosen = first.params[PRECISION_PARAM]
    checkpoint = torch.load(next((tmp_path / "checkpoints").rglob("step-*.pt")), weights_only=True)
    assert checkpoint["state"]["precision"] == chosen

    def probe_again(*args):
        raise AssertionError("a resumed run probed again")

    monkeypatch.setattr(training, "choose_precision", probe_again)
    state = train(params, data, tmp_path, ParamRecorder())  # a new logger: the state decides
    assert state.precision == chosen and state.step == 6


def test_a_run_the_tracking_run_holds_keeps_its_logged_precision(tmp_path, monkeypatch):
    """Killed before its first checkpoint, a run starts again in the same tracking run, whose
    logged steps were computed in the precision it logged."""
    monkeypatch.setattr(training, "choose_precision", lambda *args: ("fp32", ""))
    logger = ParamRecorder({PRECISION_PARAM: "bf16"})
    state = train(tiny_params(precision="auto", steps=2), tiny_data(), tmp_path, logger)
    assert state.precision == "bf16"


def test_sample_precision_takes_only_its_choices():
    with pytest.raises(ParamsError, match=r"sample\.precision"):
        from_dict({"sample": {"precision": "fp16"}})


def test_bf16_sampling_differs_from_fp32_only_slightly(tmp_path):
    train(tiny_params(), tiny_data(), tmp_path, Recorder())
    trained = load_ema_model(tmp_path / EMA_FILE, torch.device("cpu"))
    p = from_dict({"sample": {**TINY["sample"], "method": "ddim", "num_images": 8,
                              "precision": "fp32"}}).sample
    fp32, _ = generate(trained, p, progress=False)
    bf16, _ = generate(trained, dataclasses.replace(p, precision="bf16"), progress=False)
    difference = (fp32.float() - bf16.float()).abs().mean().item()
    assert 0 < difference < 4  # of 255: it ran in bf16, and bf16's rounding stays small
