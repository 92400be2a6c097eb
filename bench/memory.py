"""Training memory of each preset's UNet per image of a micro-batch, with and without gradient
checkpointing: the counts behind docs/presets.md's choice of GPU.

    uv run --frozen python -m bench.memory [--rss] [--presets cifar10 faces64 ...]

Counted on the CPU under the presets' bf16 autocast. `saved`: the bytes of the distinct tensors
that autograd keeps for the backward pass of one training forward pass, at micro-batches of 1 and
2 images; their difference is the activation memory per image, the rest (bf16 copies of the
weights) is fixed. With checkpointing the backward pass also holds the recomputed activations of
one residual block at a time: `block` is the largest block's, per image, counted without
checkpointing. `flop_ratio`: the FLOPs of a training step (forward and backward) with
checkpointing over those without. With --rss, also the peak resident memory of a whole training
step (train_step: forward, backward, AdamW) in a fresh process at micro-batches of 1 and 2: a
measurement of the CPU's allocator, to set against the counts.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import Params
from pipeline.noise_scheduler import build_scheduler
from pipeline.training import train_step
from pipeline.unet import ResBlock, UNet, build_model, count_parameters
from stages.preset import find_preset, preset_names

MIB = 2**20


def model_and_input(params: Params, batch: int, checkpointing: bool
                    ) -> tuple[UNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(params).train()
    model.gradient_checkpointing = checkpointing
    size, channels = params.preprocess.image_size, params.preprocess.channels
    return model, torch.randn(batch, channels, size, size), torch.full((batch,), 500)


def saved(params: Params, batch: int, checkpointing: bool) -> tuple[int, int]:
    """(bytes autograd keeps for the backward pass, the most that one ResBlock keeps) of a
    forward pass under bf16 autocast; each storage counted once, parameters not at all."""
    model, x, t = model_and_input(params, batch, checkpointing)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    blocks: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def before(*_: object) -> None:
        blocks.append(sum(storages.values()))

    def after(*_: object) -> None:
        blocks[-1] = sum(storages.values()) - blocks[-1]

    for module in model.modules():
        if isinstance(module, ResBlock):
            module.register_forward_pre_hook(before)
            module.register_forward_hook(after)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x, t)
    return sum(storages.values()), max(blocks)


def flop_ratio(params: Params) -> float:
    """FLOPs of a training forward and backward pass with checkpointing over those without."""
    counts = []
    for checkpointing in (False, True):
        model, x, t = model_and_input(params, 1, checkpointing)
        counter = FlopCounterMode(display=False)
        with counter:
            F.mse_loss(model(x, t), x).backward()
        counts.append(counter.get_total_flops())
    return counts[1] / counts[0]


def peak_rss(name: str, batch: int, checkpointing: bool) -> int:
    """Peak resident bytes of a fresh process that runs one train_step of the preset."""
    code = ("import sys; from bench.memory import one_step; "
            f"one_step({name!r}, {batch}, {checkpointing})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return int(done.stdout.split()[-1])


def one_step(name: str, batch: int, checkpointing: bool) -> None:
    """One bf16 train_step of the preset's model at `batch`; prints the peak RSS in bytes."""
    params = find_preset(name).params
    model, x, _ = model_and_input(params, batch, checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, build_scheduler(params), optimizer, x.clamp(-1, 1), None,
               torch.Generator().manual_seed(0), params.train, bf16=True)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux


def measure(name: str, rss: bool) -> dict[str, float]:
    params = find_preset(name).params
    (plain_1, block_1), (plain_2, block_2) = saved(params, 1, False), saved(params, 2, False)
    (ckpt_1, _), (ckpt_2, _) = saved(params, 1, True), saved(params, 2, True)
    row = {"parameters": count_parameters(build_model(params)),
           "saved_mib_per_image": (plain_2 - plain_1) / MIB,
           "fixed_mib": (2 * plain_1 - plain_2) / MIB,
           "checkpointed_saved_mib_per_image": (ckpt_2 - ckpt_1) / MIB,
           "block_mib_per_image": (block_2 - block_1) / MIB, "flop_ratio": flop_ratio(params)}
    if rss:
        for label, checkpointing in (("rss", False), ("checkpointed_rss", True)):
            one, two = (peak_rss(name, batch, checkpointing) for batch in (1, 2))
            row[f"{label}_mib_per_image"] = (two - one) / MIB
            row[f"{label}_mib_at_1"] = one / MIB
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rss", action="store_true", help="also measure the peak RSS of a step")
    parser.add_argument("--presets", nargs="+", default=[n for n in preset_names() if n != "mnist"])
    args = parser.parse_args()
    for name in args.presets:
        print(json.dumps({"preset": name, **measure(name, args.rss)}), flush=True)


if __name__ == "__main__":
    main()
