"""Exponential moving average (Polyak averaging) of model weights, which DDPM samples from.

Ho et al. 2020 evaluate an EMA of the weights with decay 0.9999 rather than the last iterate: it
smooths out the noise of the final SGD steps and gives visibly better samples. After every
optimiser step, `update` moves each averaged tensor towards the live one:

    ema = d * ema + (1 - d) * param,   d = min(decay, (1 + n) / (10 + n)) for the n-th update,

where the min is the warm-up of TensorFlow's ExponentialMovingAverage (num_updates): early on d is
small, so the average forgets the random initialisation within tens of steps instead of the
~1 / (1 - decay) steps a fixed 0.9999 would need. With warmup=False, d = decay throughout.

The average covers everything in the model's state_dict, keyed by the same names: parameters and
floating-point buffers are averaged in float32 (even for a bf16 model, so small updates are not
rounded away); other buffers (integer counters) are copied as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class EMA:
    """A float32 moving average of a model's weights, for sampling and checkpoints."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay={decay} must be in [0, 1]")
        self.decay = decay
        self.warmup = warmup
        self.step = 0  # updates applied so far
        self.shadow = {name: _detached_copy(t) for name, t in model.state_dict().items()}
        self._floats = [name for name, t in self.shadow.items() if t.is_floating_point()]
        self._others = [name for name, t in self.shadow.items() if not t.is_floating_point()]

    @property
    def current_decay(self) -> float:
        """The d that the latest update used, for logging."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.step) / (10 + self.step))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average; call after each optimiser step."""
        live = self._live_state(model)
        self.step += 1
        weight = 1.0 - self.current_decay  # lerp(ema, p, w) = (1 - w) * ema + w * p
        torch._foreach_lerp_([self.shadow[n] for n in self._floats],
                             [live[n].float() for n in self._floats], weight)
        for name in self._others:
            self.shadow[name].copy_(live[name])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's weights with the average (cast to the model's dtypes)."""
        for name, tensor in self._live_state(model).items():
            tensor.copy_(self.shadow[name])

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the block with the averaged weights in the model, then restore the training weights.

        The training weights come back even if the block raises, so a failed sample grid cannot
        leave the optimiser stepping the averaged weights.
        """
        backup = {name: t.clone() for name, t in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(backup)

    def state_dict(self) -> dict[str, Any]:
        """The step and the averaged tensors; decay and warm-up are configuration, not state."""
        return {"step": self.step, "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() saved, into this EMA's tensors (keeping their device)."""
        _check_names(set(self.shadow), set(state["shadow"]), what="EMA checkpoint")
        for name, tensor in state["shadow"].items():
            self.shadow[name].copy_(tensor)
        self.step = int(state["step"])

    def _live_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state_dict: detached tensors sharing storage with its weights."""
        live = model.state_dict()
        _check_names(set(self.shadow), set(live), what="model")
        return live


def _detached_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy that shares nothing with the model, in float32 if it is floating-point at all."""
    dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to(dtype, copy=True)


def _check_names(expected: set[str], got: set[str], what: str) -> None:
    if expected != got:
        raise ValueError(f"{what} does not match the EMA: missing {sorted(expected - got)}, "
                         f"unexpected {sorted(got - expected)}")
