"""The benchmarked configurations, and both models built from one: the project's UNet and
diffusers' UNet2DModel with the same architecture (the reference).

The mapping (pipeline/unet.py on the left, UNet2DModel's arguments on the right):

    base_channels * channel_mult      block_out_channels
    num_res_blocks                    layers_per_block (down; up has one more in both)
    attention_resolutions             AttnDownBlock2D / AttnUpBlock2D at those sizes, else
                                      DownBlock2D / UpBlock2D; mid-block attention
                                      (add_attention) if the lowest size is listed
    num_heads                         attention_head_dim = width of the attended level / num_heads
    norm_groups, dropout              norm_num_groups, dropout
    num_classes (> 0)                 num_class_embeds = num_classes + 1 (the null class)
    self_condition (true)             none: refused, not in the reference

Both are the DDPM UNet (Ho et al. 2020, Appendix B): the same ResBlocks (GroupNorm-SiLU-conv, the
timestep embedding added in between, 1x1 skip conv where the width changes), the same attention
(GroupNorm, q/k/v and output projections with bias: 1x1 convs here, Linear layers there, the same
weights), the same 4 x base_channels timestep MLP, stride-2 conv down, nearest + conv up. So the
parameter counts are equal. The one difference: UNet2DModel has one head width for all attention
levels, the project one head count; they agree when attention is at one width only, as in both
configurations here (bench checks it and says so otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pipeline.config import Params, feature_map_sizes, from_dict, load_params, to_dict
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
    """diffusers' UNet2DModel with the project UNet's architecture (see the module docstring)."""
    m, size = params.model, params.preprocess.image_size
    if m.self_condition:
        raise ValueError("model.self_condition = true is not in the reference: diffusers' "
                         "UNet2DModel takes no x0 estimate; benchmark with model.self_condition "
                         "= false")
    from diffusers import UNet2DModel  # bench-only dependency

    sizes = feature_map_sizes(size, len(m.channel_mult))
    widths = [m.base_channels * mult for mult in m.channel_mult]
    attended = [w for w, s in zip(widths, sizes) if s in m.attention_resolutions]
    return UNet2DModel(
        sample_size=size, in_channels=params.preprocess.channels,
        out_channels=params.preprocess.channels,
        block_out_channels=tuple(widths), layers_per_block=m.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if s in m.attention_resolutions else "DownBlock2D"
                               for s in sizes),
        up_block_types=tuple("AttnUpBlock2D" if s in m.attention_resolutions else "UpBlock2D"
                             for s in reversed(sizes)),
        add_attention=sizes[-1] in m.attention_resolutions,
        attention_head_dim=(attended[0] if attended else widths[-1]) // m.num_heads,
        norm_num_groups=m.norm_groups, dropout=m.dropout,
        num_class_embeds=m.num_classes + 1 if m.num_classes else None)


def head_mismatch(params: Params) -> str | None:
    """Why the reference's attention heads differ from the project's, or None if they agree."""
    m = params.model
    sizes = feature_map_sizes(params.preprocess.image_size, len(m.channel_mult))
    widths = {m.base_channels * mult for mult, s in zip(m.channel_mult, sizes)
              if s in m.attention_resolutions}
    if len(widths) <= 1:
        return None
    return (f"attention at widths {sorted(widths)}: the reference uses head width "
            f"{min(widths) // m.num_heads} at all of them, the project {m.num_heads} heads")


BUILDERS = {"project": project_model, "reference": reference_model}


def build(impl: str, params: Params) -> nn.Module:
    return BUILDERS[impl](params)


def parameter_counts(params: Params) -> dict[str, int]:
    return {impl: count_parameters(build(impl, params)) for impl in BUILDERS}
