"""Our UNet and noise schedule in diffusers' terms: UNet2DModel's and DDPMScheduler's configs, and
the state_dict mapping between the UNets, for the export (pipeline/export.py) and the benchmark.

The architecture (pipeline/unet.py on the left, UNet2DModel's arguments on the right):

    base_channels * channel_mult      block_out_channels (channel_mult[0] must be 1: UNet2DModel's
                                      conv_in and timestep embedding have the width of level 0)
    num_res_blocks                    layers_per_block (down; up has one more in both)
    attention_resolutions             AttnDownBlock2D / AttnUpBlock2D at those sizes, else
                                      DownBlock2D / UpBlock2D; mid-block attention
                                      (add_attention) if the lowest size is listed
    num_heads                         attention_head_dim = width of the attended levels / num_heads
    norm_groups, dropout              norm_num_groups, dropout
    num_classes (> 0)                 num_class_embeds = num_classes + 1 (the null class)
    timestep_embedding                flip_sin_to_cos = False (sines first), freq_shift = 0
    self_condition (true)             none: refused, UNet2DModel takes no x0 estimate

Both are the DDPM UNet (Ho et al. 2020, Appendix B): the same ResBlocks (GroupNorm-SiLU-conv, the
timestep embedding added in between, 1x1 skip conv where the width changes), the same attention
(GroupNorm, q/k/v and output projections with bias: 1x1 convs here, Linear layers there, the same
weights), the same 4 x base_channels timestep MLP, stride-2 conv down, nearest + conv up, so the
parameter counts are equal. UNet2DModel has one head width for all attention levels, the project
one head count: a model with attention at two widths is refused.

The noise schedule (pipeline/noise_scheduler.py -> DDPMScheduler): linear, scaled_linear and
sigmoid by name, cosine as squaredcos_cap_v2 (the same IDDPM eq. 17, capped at 0.999), exponential
(no diffusers name) as its trained_betas; rescale_zero_terminal_snr as rescale_betas_zero_snr.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from pipeline.config import DiffusionParams, Params, SampleParams, feature_map_sizes
from pipeline.noise_scheduler import make_betas

# diffusers' names of the schedules it has; the others are written as their betas.
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                  "cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid"}
RESBLOCK = {"norm1": "norm1", "conv1": "conv1", "emb": "time_emb_proj", "norm2": "norm2",
            "conv2": "conv2", "skip": "conv_shortcut"}


def unexpressible(params: Params) -> str | None:
    """Why UNet2DModel cannot be this model, naming the param, or None."""
    m = params.model
    if m.space == "latent":
        return ("model.space = 'latent': the model denoises an autoencoder's latents, and "
                "diffusers' DDPMPipeline, UNet2DModel and DDPMScheduler have no place for the "
                "autoencoder that decodes them into images; only a model trained with "
                "model.space = 'pixel' can be expressed")
    if params.diffusion.formulation == "edm":
        return ("diffusion.formulation = 'edm': EDM's preconditioning (c_skip, c_out, c_in, "
                "c_noise; Karras et al. 2022, Table 1) and continuous noise levels have no "
                "DDPMScheduler; only a model trained with diffusion.formulation = 'ddpm' can be "
                "expressed")
    if m.self_condition:
        return ("model.self_condition = true: diffusers' UNet2DModel takes no x0 estimate "
                "(self-conditioning, Chen et al. 2022); only a model trained with "
                "model.self_condition = false can be expressed")
    if m.channel_mult[0] != 1:
        return (f"model.channel_mult = {list(m.channel_mult)}: UNet2DModel's first level has the "
                f"width of its input conv and timestep embedding, so channel_mult[0] must be 1")
    widths = sorted(set(_attended_widths(params)))
    if len(widths) > 1:
        return (f"model.attention_resolutions = {list(m.attention_resolutions)} puts attention at "
                f"widths {widths}: with model.num_heads = {m.num_heads} their head widths differ, "
                f"and UNet2DModel has one head width for all attention")
    return None


def _attended_widths(params: Params) -> list[int]:
    m = params.model
    sizes = feature_map_sizes(params.preprocess.image_size, len(m.channel_mult))
    return [m.base_channels * mult for mult, s in zip(m.channel_mult, sizes)
            if s in m.attention_resolutions]


def unet_config(params: Params) -> dict[str, Any]:
    """UNet2DModel's arguments for the model of `params` (raises ValueError if unexpressible)."""
    problem = unexpressible(params)
    if problem:
        raise ValueError(problem)
    m, size = params.model, params.preprocess.image_size
    sizes = feature_map_sizes(size, len(m.channel_mult))
    widths = [m.base_channels * mult for mult in m.channel_mult]
    attended = _attended_widths(params)
    attention = ["Attn" if s in m.attention_resolutions else "" for s in sizes]
    return dict(
        sample_size=size, in_channels=params.preprocess.channels,
        out_channels=params.preprocess.channels,
        block_out_channels=tuple(widths), layers_per_block=m.num_res_blocks,
        down_block_types=tuple(f"{a}DownBlock2D" for a in attention),
        up_block_types=tuple(f"{a}UpBlock2D" for a in reversed(attention)),
        add_attention=sizes[-1] in m.attention_resolutions,
        attention_head_dim=(attended[0] if attended else widths[-1]) // m.num_heads,
        norm_num_groups=m.norm_groups, dropout=m.dropout,
        flip_sin_to_cos=False, freq_shift=0,  # pipeline.unet.timestep_embedding: sin, then cos
        num_class_embeds=m.num_classes + 1 if m.num_classes else None)


def module_names(params: Params) -> dict[str, str]:
    """Our module names -> UNet2DModel's, for every module that holds weights."""
    m = params.model
    levels = len(m.channel_mult)
    names = {"time_mlp.0": "time_embedding.linear_1", "time_mlp.2": "time_embedding.linear_2",
             "class_emb": "class_embedding", "conv_in": "conv_in",
             "norm_out": "conv_norm_out", "conv_out": "conv_out"}

    def resblock(ours: str, theirs: str, index: int) -> None:
        for part, their_part in RESBLOCK.items():
            names[f"{ours}.{part}"] = f"{theirs}.resnets.{index}.{their_part}"
        names[f"{ours}.attn.norm"] = f"{theirs}.attentions.{index}.group_norm"
        names[f"{ours}.attn.qkv"] = f"{theirs}.attentions.{index}"  # split into to_q, to_k, to_v
        names[f"{ours}.attn.proj"] = f"{theirs}.attentions.{index}.to_out.0"

    # pipeline.unet.UNet's flat lists, walked in the order its constructor fills them.
    i = 0
    for level in range(levels):
        for j in range(m.num_res_blocks):
            resblock(f"down.{i}", f"down_blocks.{level}", j)
            i += 1
        if level < levels - 1:
            names[f"down.{i}"] = f"down_blocks.{level}.downsamplers.0.conv"
            i += 1
    resblock("mid.0", "mid_block", 0)
    resblock("mid.1", "mid_block", 1)
    i = 0
    for block, level in enumerate(reversed(range(levels))):
        for j in range(m.num_res_blocks + 1):
            resblock(f"up.{i}", f"up_blocks.{block}", j)
            i += 1
        if level > 0:
            names[f"up.{i}.1"] = f"up_blocks.{block}.upsamplers.0.conv"  # .0 is the Upsample
            i += 1
    return names


def unet_state_dict(state: dict[str, Tensor], params: Params) -> dict[str, Tensor]:
    """Our UNet's state_dict as UNet2DModel's (unet_config(params)); the same numbers."""
    names = module_names(params)
    out = {}
    for key, value in state.items():
        module, kind = key.rsplit(".", 1)  # kind: weight or bias
        theirs = names[module]
        if module.endswith(".attn.qkv"):  # one 1x1 conv of 3C outputs: q, k, v in this order
            for part, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3)):
                out[f"{theirs}.{part}.{kind}"] = _as_linear(chunk)
        elif module.endswith(".attn.proj"):
            out[f"{theirs}.{kind}"] = _as_linear(value)
        else:
            out[f"{theirs}.{kind}"] = value
    return out


def _as_linear(value: Tensor) -> Tensor:
    """A 1x1 conv's weight [out, in, 1, 1] as a Linear's [out, in]; a bias as it is."""
    return value.flatten(1).contiguous() if value.ndim == 4 else value


def scheduler_config(diffusion: DiffusionParams, sample: SampleParams) -> dict[str, Any]:
    """DDPMScheduler's arguments for the forward process of `diffusion`, sampled as `sample` says
    (clipping, variance, timestep spacing: the sample.* params the DDPM sampler reads)."""
    config = dict(num_train_timesteps=diffusion.num_timesteps,
                  beta_start=diffusion.beta_start, beta_end=diffusion.beta_end,
                  prediction_type=diffusion.prediction_type,
                  rescale_betas_zero_snr=diffusion.rescale_zero_terminal_snr,
                  clip_sample=sample.clip_sample, clip_sample_range=1.0,
                  variance_type=sample.variance_type, timestep_spacing=sample.timestep_spacing,
                  steps_offset=0)
    if diffusion.schedule in BETA_SCHEDULES:
        return {**config, "beta_schedule": BETA_SCHEDULES[diffusion.schedule]}
    betas = make_betas(diffusion.schedule, diffusion.num_timesteps, diffusion.beta_start,
                       diffusion.beta_end)  # diffusers rescales trained_betas too, as we do
    return {**config, "beta_schedule": "linear", "trained_betas": betas.tolist()}
