"""Where the networks run, and in which precision: the one place that asks for CUDA.

CUDA when there is a GPU, else the CPU. bf16 autocast for `precision: bf16`, or for `auto`
where the hardware runs bf16 natively (CUDA GPUs that support it, CPUs with oneDNN's bf16).
"""

from __future__ import annotations

import torch

from pipeline.config import Precision


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_bf16(precision: Precision, device: torch.device) -> bool:
    """bf16 autocast for precision "bf16", or for "auto" where the hardware runs bf16 natively."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
