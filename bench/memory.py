"""Training memory of each preset's UNet per image of a micro-batch, with and without gradient
checkpointing, and of a latent preset's autoencoder: the counts behind docs/presets.md's choice
of GPU.

    uv run --frozen python -m bench.memory [--presets cifar10 faces64 ...]

Counted on the CPU under the presets' bf16 autocast. `saved`: the bytes of the distinct tensors
that autograd keeps for the backward pass of one training forward pass, at micro-batches of 1 and
2 images; their difference is the activation memory per image, the rest (bf16 copies of the
weights) is fixed. With checkpointing the backward pass also holds the recomputed activations of
one residual block at a time: `block` is the largest block's, per image, counted without
checkpointing. `flop_ratio`: the FLOPs of a training step (forward and backward) with
checkpointing over those without. (The peak RSS of a CPU training step at micro-batches of 1
and 2 was tried as a measurement to set against the counts: it is the same at both, set by what
does not grow with the batch, so it says nothing about activations at this size.)

A latent preset's UNet is counted on its input, the latents (4 channels, image_size / factor a
side). Its autoencoder (stage train_autoencoder, before the UNet's) trains in fp32 without
autocast or micro-batches: `autoencoder_saved_mib_per_image` is counted the same way over a
training forward pass (encode, sample the posterior, decode, the loss), with its parameter count
and the forward FLOPs of an encode and a decode per image (`autoencoder_gflop_per_image`);
`decode_gflop_per_image` is the decoder's alone, the pass that turns each sampled latent into an
image.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pipeline.autoencoder import Autoencoder, autoencoder_loss, build_autoencoder
from pipeline.config import Params, unet_input
from pipeline.unet import ResBlock, UNet, build_model, count_parameters
from stages.preset import find_preset, preset_names

MIB = 2**20


def model_and_input(params: Params, batch: int, checkpointing: bool
                    ) -> tuple[UNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(params).train()
    model.gradient_checkpointing = checkpointing
    channels, size = unet_input(params)  # the images, or a latent model's latents
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


def images(params: Params, batch: int) -> torch.Tensor:
    size, channels = params.preprocess.image_size, params.preprocess.channels
    return torch.rand(batch, channels, size, size) * 2 - 1


def autoencoder_saved(params: Params, batch: int) -> int:
    """Bytes autograd keeps for the backward pass of one fp32 training forward pass of the
    autoencoder and its loss (pipeline/autoencoder_training.py's train_step); each storage
    counted once, parameters not at all."""
    torch.manual_seed(0)
    model = build_autoencoder(params).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = images(params, batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        reconstruction, posterior = model(x)
        autoencoder_loss(x, reconstruction, posterior, params.autoencoder.kl_weight)
    return sum(storages.values())


def forward_flops(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops()


def measure_autoencoder(params: Params) -> dict[str, float]:
    model: Autoencoder = build_autoencoder(params).eval()
    x = images(params, 1)
    z = torch.randn(1, *model.latent_shape)
    one, two = autoencoder_saved(params, 1), autoencoder_saved(params, 2)
    return {"autoencoder_parameters": count_parameters(model),
            "autoencoder_saved_mib_per_image": (two - one) / MIB,
            "autoencoder_fixed_mib": (2 * one - two) / MIB,
            "autoencoder_gflop_per_image": (forward_flops(model.encoder, x)
                                            + forward_flops(model.decoder, z)) / 1e9,
            "decode_gflop_per_image": forward_flops(model.decoder, z) / 1e9}


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


def measure(name: str) -> dict[str, float]:
    params = find_preset(name).params
    (plain_1, block_1), (plain_2, block_2) = saved(params, 1, False), saved(params, 2, False)
    (ckpt_1, _), (ckpt_2, _) = saved(params, 1, True), saved(params, 2, True)
    model, x, t = model_and_input(params, 1, False)
    latent = measure_autoencoder(params) if params.model.space == "latent" else {}
    return {"parameters": count_parameters(build_model(params)),
            "gflop_per_image": forward_flops(model.eval(), x, t) / 1e9,
            "saved_mib_per_image": (plain_2 - plain_1) / MIB,
            "fixed_mib": (2 * plain_1 - plain_2) / MIB,
            "checkpointed_saved_mib_per_image": (ckpt_2 - ckpt_1) / MIB,
            "block_mib_per_image": (block_2 - block_1) / MIB, "flop_ratio": flop_ratio(params),
            **latent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=[n for n in preset_names() if n != "mnist"])
    args = parser.parse_args()
    for name in args.presets:
        print(json.dumps({"preset": name, **measure(name)}), flush=True)


if __name__ == "__main__":
    main()
