"""Arithmetic work: FLOPs per image of the project's UNet, and the device's bf16 matmul rate.

The achieved rate (FLOPs per image x images/s) over the measured rate of a large bf16 matmul is
the share of the device's practical peak that a model uses; on a GPU it says how much is left.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.models import project_model
from bench.worker import SAMPLE_STEPS
from pipeline.config import Params


def flops_per_image(params: Params, task: str) -> float:
    """FLOPs per image: forward + backward for "train", 50 forwards for "sample" (DDIM, 50 steps).

    Counted on one image on the CPU in fp32 (the count does not depend on device or dtype);
    attention kernels without a registered formula are not counted (a small part here).
    """
    model = project_model(params)
    size, channels = params.preprocess.image_size, params.preprocess.channels
    x = torch.randn(1, channels, size, size)
    t = torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        if task == "train":
            F.mse_loss(model(x, t), x).backward()
        else:
            with torch.no_grad():
                model(x, t)
    per_call = counter.get_total_flops()
    return per_call if task == "train" else per_call * SAMPLE_STEPS


def matmul_flops_per_s(device: torch.device, quick: bool = False) -> float:
    """FLOP/s of an n x n bf16 matmul (2 n^3 FLOPs), the best of a few after one warm-up.

    quick: n = 512 on a CPU, where a CPU without AVX-512 runs bf16 at well under 1 GFLOP/s and
    four 2048 x 2048 products take minutes."""
    n = 8192 if device.type == "cuda" else 512 if quick else 2048
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for i in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
