"""Where the networks run, and in which precision: the one place that asks for CUDA.

CUDA when there is a GPU, else the CPU. Precision "fp32" and "bf16" (autocast) are taken as
given. "auto" is bf16 on CUDA GPUs that support it, fp32 on other GPUs; on a CPU it is measured,
not read from the CPU's flags: whether bf16 autocast is faster depends on more than the flags
(a 2-core Xeon without AMX trained the default model slower in bf16, an AMD EPYC 1.6x faster;
docs/benchmarks.md), so `choose_precision` times a few steps of the actual work both ways.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from pipeline.config import Precision

Step = Callable[[bool], object]  # runs one step of the work, under bf16 autocast if told so


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fixed_precision(precision: Precision, device: torch.device) -> str | None:
    """"fp32" or "bf16" where no measurement is needed: an explicit choice, or "auto" on a GPU;
    None for "auto" on a CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return None if device.type == "cpu" else "fp32"


def choose_precision(precision: Precision, device: torch.device, make_step: Callable[[], Step]
                     ) -> tuple[str, str]:
    """The precision to run in ("fp32" or "bf16"), and how it was chosen, for the log line.
    Only "auto" on a CPU builds the step (`make_step`) and times it (`fastest_precision`)."""
    fixed = fixed_precision(precision, device)
    if fixed is not None:
        return fixed, ""
    fastest, times = fastest_precision(make_step())
    return fastest, f" (probe: fp32 {times['fp32'] * 1e3:.0f} ms/step, " \
                    f"bf16 {times['bf16'] * 1e3:.0f} ms/step)"


def fastest_precision(step: Step, repeats: int = 3, decisive: float = 2.0
                      ) -> tuple[str, dict[str, float]]:
    """The faster precision of `step(bf16)`, and the median seconds of each.

    One warm-up of each (oneDNN builds its kernels on the first call), then `repeats` timed
    calls of each, alternating, so that a change in the machine's load hits both alike. A round
    in which one precision takes more than `decisive` times the other ends the probe: load
    noise does not make up a factor of 2, and on a CPU without AVX-512 a bf16 step of the
    default model takes 10x an fp32 one (5 s), so each further round would cost seconds. The
    global random states are put back afterwards (dropout draws from them), so the caller's run
    draws exactly what it would have drawn without the probe; the step itself must leave the
    caller's weights alone (work on a copy).
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    try:
        for repeat in range(repeats + 1):
            for name, seconds in times.items():
                start = time.perf_counter()
                step(name == "bf16")
                if repeat:  # repeat 0 is the warm-up
                    seconds.append(time.perf_counter() - start)
            if repeat and is_decisive(times["fp32"][-1], times["bf16"][-1], decisive):
                break
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    return min(medians, key=medians.__getitem__), medians


def is_decisive(fp32_seconds: float, bf16_seconds: float, factor: float) -> bool:
    return max(fp32_seconds, bf16_seconds) > factor * min(fp32_seconds, bf16_seconds)
