"""The benchmarked configurations, and both models built from one: the project's UNet and
diffusers' UNet2DModel with the same architecture (the reference), as pipeline/diffusers_map.py
maps it (the export to diffusers uses the same mapping; a model it cannot express is refused).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pipeline.config import Params, from_dict, load_params, to_dict
from pipeline.diffusers_map import unet_config
from pipeline.unet import build_model, count_parameters


@dataclass(frozen=True)
class BenchConfig:
    name: str
    params: Params  # model, preprocess (image size, channels), train (batch, lr, precision)
    sample_batch: int  # images per DDIM run of 50 steps

    @property
    def train_batch(self) -> int:
        return self.params.train.batch_size


# The DDPM paper's CIFAR-10 UNet (Ho et al. 2020, Appendix B): 32x32 RGB, base width 128,
# channel_mult [1, 2, 2, 2], 2 blocks per level, attention at 16x16, dropout 0.1, batch 128.
CIFAR10 = {"preprocess": {"image_size": 32, "channels": 3},
           "model": {"base_channels": 128, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2,
                     "attention_resolutions": [16], "num_heads": 4, "dropout": 0.1,
                     "norm_groups": 32},
           "train": {"batch_size": 128}}
# On a CPU the paper's model takes ~10 s per step of 16 images on 2 cores: a quarter of its
# width (1/16 of its FLOPs, same shape) and small batches keep `python -m bench` to minutes.
CPU_CIFAR10 = {"model": {"base_channels": 32, "norm_groups": 16}, "train": {"batch_size": 16}}
TINY = {"model": {"base_channels": 8, "norm_groups": 4}, "train": {"batch_size": 4}}


def configs(device: str, params_file: str = "params.yaml", quick: bool = False
            ) -> dict[str, BenchConfig]:
    """"default": params.yaml's model and batch; "cifar10": the DDPM paper's CIFAR-10 UNet (on a
    CPU at a quarter of its width and batch 16). quick: both at width 8, batch 4, for a smoke run."""
    default = to_dict(load_params(params_file))
    cifar = merge(default, CIFAR10)
    if quick:
        return {"default": BenchConfig("default", params_of(merge(default, TINY)), 4),
                "cifar10": BenchConfig("cifar10", params_of(merge(cifar, TINY)), 4)}
    if device == "cuda":
        return {"default": BenchConfig("default", params_of(default),
                                       default["sample"]["batch_size"]),
                "cifar10": BenchConfig("cifar10", params_of(cifar), 256)}
    return {"default": BenchConfig("default", params_of(default), 16),
            "cifar10": BenchConfig("cifar10", params_of(merge(cifar, CPU_CIFAR10)), 8)}


def merge(base: dict, override: dict) -> dict:
    """base with override's sections' keys replaced."""
    return {section: {**values, **override.get(section, {})} for section, values in base.items()}


def params_of(raw: dict) -> Params:
    return from_dict(raw, check_combinations=False)


def project_model(params: Params) -> nn.Module:
    return build_model(params)


def reference_model(params: Params) -> nn.Module:
    """diffusers' UNet2DModel with the project UNet's architecture (pipeline/diffusers_map.py)."""
    config = unet_config(params)  # first: it refuses what UNet2DModel cannot express
    from diffusers import UNet2DModel  # bench-only dependency

    return UNet2DModel(**config)


BUILDERS = {"project": project_model, "reference": reference_model}


def build(impl: str, params: Params) -> nn.Module:
    return BUILDERS[impl](params)


def parameter_counts(params: Params) -> dict[str, int]:
    return {impl: count_parameters(build(impl, params)) for impl in BUILDERS}
