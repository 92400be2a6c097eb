"""EMA of the weights: the decay arithmetic, swapping weights in for sampling, checkpoints."""

import io

import pytest
import torch
from torch import nn

from pipeline.ema import EMA


class Scalars(nn.Module):
    """One parameter, one float buffer and one integer buffer, each a single number."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.register_buffer("running", torch.zeros(1))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    def set(self, value: float) -> None:
        with torch.no_grad():
            self.weight.fill_(value)
            self.running.fill_(value)
            self.count.fill_(int(value))


def test_warmup_decay_by_hand() -> None:
    # Averaging a constant 1 from 0, after n updates ema = 1 - d_1 * .. * d_n,
    # with d_n = min(0.9999, (1 + n) / (10 + n)) = 2/11, 3/12, 4/13.
    model = Scalars()
    ema = EMA(model, decay=0.9999)
    model.set(1.0)
    expected = [9 / 11, 21 / 22, 141 / 143]  # 1 - 2/11, 1 - 2/11*3/12, 1 - 2/11*3/12*4/13
    decays = [2 / 11, 3 / 12, 4 / 13]
    for n in range(3):
        ema.update(model)
        assert ema.step == n + 1
        assert ema.current_decay == pytest.approx(decays[n])
        assert ema.shadow["weight"].item() == pytest.approx(expected[n], abs=1e-6)
        assert ema.shadow["running"].item() == pytest.approx(expected[n], abs=1e-6)
        assert ema.shadow["count"].item() == 1  # integer buffers are copied, not averaged
    assert ema.shadow["weight"].dtype == torch.float32


def test_warmup_stops_at_decay() -> None:
    # (1 + n) / (10 + n) passes 0.5 at n = 9: from then on d is the configured decay.
    model = Scalars()
    ema = EMA(model, decay=0.5)
    for _ in range(8):
        ema.update(model)
    assert ema.current_decay == pytest.approx(9 / 18)
    ema.update(model)
    assert ema.current_decay == 0.5


def test_warmup_weights_of_a_short_run_are_a_power_function() -> None:
    # Unrolled, the warm-up gives update k of n the weight 9 / (10 + k) * prod_{j>k} (1 + j) /
    # (10 + j) = 9 (k + 2)(k + 3)..(k + 9) / ((n + 2)(n + 3)..(n + 10)): a degree-8 power profile
    # (docs/quality.md). Below n = 890 the configured decay never binds, so 0.99 and 0.995 agree.
    n = 750
    values = torch.sin(torch.arange(1, n + 1, dtype=torch.float64))  # the weight at update k
    k = torch.arange(1, n + 1, dtype=torch.float64)
    weights = 9 * torch.stack([k + i for i in range(2, 10)]).prod(0) / torch.prod(
        torch.arange(n + 2, n + 11, dtype=torch.float64))
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-9)  # the zero start weighs ~0
    averages = []
    for decay in (0.99, 0.995):
        model = Scalars()
        ema = EMA(model, decay=decay)
        for value in values:
            model.set(value.item())
            ema.update(model)
        averages.append(ema.shadow["weight"].item())
    assert averages[0] == averages[1]
    assert averages[0] == pytest.approx((weights * values).sum().item(), abs=1e-5)


def test_fixed_decay_by_hand() -> None:
    model = Scalars()
    ema = EMA(model, decay=0.9, warmup=False)
    model.set(1.0)
    for expected in [0.1, 0.19, 0.271]:  # 1 - 0.9**n
        ema.update(model)
        assert ema.current_decay == 0.9
        assert ema.shadow["weight"].item() == pytest.approx(expected, abs=1e-6)


def test_average_tracks_a_bf16_model_in_float32() -> None:
    # The update adds 0.001, far below the spacing of bf16 numbers near 1 (0.0078).
    model = Scalars().to(torch.bfloat16)
    model.set(1.0)
    ema = EMA(model, decay=0.999, warmup=False)
    model.set(2.0)
    ema.update(model)
    assert ema.shadow["weight"].item() == pytest.approx(1.001, abs=1e-6)


def test_swapped_in_uses_the_average_then_restores() -> None:
    model = Scalars()
    ema = EMA(model, decay=0.9, warmup=False)  # averages of 0 and 5: 0.5
    model.set(5.0)
    ema.update(model)

    with ema.swapped_in(model):
        assert model.weight.item() == pytest.approx(0.5)
        assert model.running.item() == pytest.approx(0.5)
    assert model.weight.item() == 5.0
    assert model.running.item() == 5.0
    assert model.count.item() == 5

    with pytest.raises(RuntimeError, match="sampling failed"):
        with ema.swapped_in(model):
            assert model.weight.item() == pytest.approx(0.5)
            raise RuntimeError("sampling failed")
    assert model.weight.item() == 5.0
    assert ema.shadow["weight"].item() == pytest.approx(0.5)  # the average is left alone


def test_copy_to_writes_the_average() -> None:
    model = Scalars()
    ema = EMA(model, decay=0.9, warmup=False)
    model.set(5.0)
    ema.update(model)
    ema.copy_to(model)
    assert model.weight.item() == pytest.approx(0.5)


def test_state_dict_round_trip() -> None:
    model = Scalars()
    ema = EMA(model, decay=0.9999)
    model.set(1.0)
    for _ in range(3):
        ema.update(model)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)

    resumed = EMA(Scalars(), decay=0.9999)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.step == 3
    assert resumed.current_decay == pytest.approx(4 / 13)
    assert resumed.shadow["weight"].item() == pytest.approx(141 / 143, abs=1e-6)
    assert resumed.shadow["count"].item() == 1

    # Resuming continues the same sequence: the 4th update uses d = 5/14.
    ema.update(model)
    resumed.update(model)
    assert resumed.shadow["weight"].item() == ema.shadow["weight"].item()


def test_mismatched_model_is_rejected() -> None:
    ema = EMA(Scalars())
    with pytest.raises(ValueError, match=r"missing \['count', 'running'\], unexpected \['bias'\]"):
        ema.update(nn.Linear(1, 1))
