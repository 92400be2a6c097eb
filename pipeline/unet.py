"""The UNet that predicts the noise (or v, or x0) in a noisy image, given the timestep and a class.

The architecture follows DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models",
Appendix B): a convolutional UNet of residual blocks with GroupNorm, self-attention at chosen
feature-map sizes, and a sinusoidal timestep embedding (Vaswani et al. 2017, "Attention Is All You
Need") fed through an MLP and added inside every residual block. From Improved DDPM (Nichol &
Dhariwal 2021) and ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis") it
takes multi-head attention, a class embedding added to the timestep embedding, and zero-initialised
last layers, so every residual branch and the output start at zero and training begins from a
well-conditioned network.

Self-conditioning (Chen, Zhang & Hinton 2022, "Analog Bits", arXiv:2208.04202, sec. 3, Fig. 3):
with ``self_condition=True`` the network takes a second image, its own previous estimate of x0,
concatenated to x_t on the channel axis, so the first conv reads 2 * in_channels channels. Zeros
stand for "no estimate yet" (training half of the time, the first sampling step); the training
and sampling sides are pipeline/training.py's train_step and pipeline/sampler.py's sample.

Gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): with
``gradient_checkpointing=True`` a training forward pass keeps only the inputs of each residual
block (with its attention) and recomputes the block's activations in the backward pass. The
recomputation replays the random state of the forward pass (torch.utils.checkpoint's default),
so dropout draws the same masks and the gradients are those without it. Passes without gradient
(sampling, self-conditioning's estimate) run as usual.

Shapes through the network, for levels i = 0 .. len(channel_mult) - 1:

    level i works at side length image_size / 2**i with base_channels * channel_mult[i] channels.
    down path: num_res_blocks blocks per level, then a stride-2 conv (except after the last level);
    middle:    block, self-attention (if the lowest side length is listed), block;
    up path:   num_res_blocks + 1 blocks per level, each fed the matching down-path activation,
               then nearest-neighbour 2x upsampling and a conv (except after level 0).

Resolution rules (pipeline/config.py's `unet_problem`, which checks params.yaml when it is loaded;
the constructor raises ValueError with the same message, naming the values):

* image_size must be divisible by 2**(len(channel_mult) - 1), so every downsampling halves an even
  side and upsampling retraces it exactly: 28 px allows up to 3 levels (28, 14, 7), 32 px up to 6.
* Self-attention runs after every residual block whose output side length is in
  attention_resolutions, on the down path, the up path and in the middle alike; each entry must be
  one of the side lengths that occur (image_size / 2**i).
* base_channels and every level's channel count must be divisible by norm_groups; the channel
  count at each attention level must be divisible by num_heads; base_channels must be even (the
  sinusoidal embedding is half sines, half cosines).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import Params, feature_map_sizes, unet_input, unet_problem


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t [B] (integer or float) -> [B, dim].

    Row b is [sin(t_b * w_0), .., sin(t_b * w_{h-1}), cos(t_b * w_0), .., cos(t_b * w_{h-1})] with
    h = dim / 2 and w_i = max_period**(-i / h): the Transformer's positional encoding with the
    timestep as the position, wavelengths spanning 2*pi .. 2*pi*max_period.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, device=t.device))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def zero_init(module: nn.Conv2d) -> nn.Conv2d:
    """Zero a layer's weight and bias, so the residual branch (or output) it ends starts at zero."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class SelfAttention(nn.Module):
    """Multi-head self-attention over all pixels of a feature map, as a residual branch."""

    def __init__(self, channels: int, num_heads: int, norm_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = zero_init(nn.Conv2d(channels, channels, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        qkv = qkv.transpose(-1, -2)  # [B, 3, heads, H*W, head_dim], strided
        # On CPU (docs/benchmarks.md): in fp32, a contiguous copy reaches SDPA's fused kernel,
        # which samples the default model 1.4x and a 16x16-attention model 7x faster. Under bf16
        # autocast the strided views (SDPA's unfused path) train the default model's 7x7 maps
        # ~25% faster, but 14x14 and 16x16 maps only ~5% faster, at 1.7x the peak memory of the
        # copy: the unfused path keeps whole [tokens x tokens] attention maps for the backward.
        if qkv.dtype == torch.float32 or H * W > 100:
            qkv = qkv.contiguous()
        q, k, v = qkv.unbind(1)  # each [B, heads, H*W, head_dim]
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding added in between; then optional self-attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float,
                 norm_groups: int, attention: bool, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.emb = nn.Linear(emb_dim, out_channels)  # per-channel shift from time (+ class)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1))
        # A 1x1 conv matches channels on the skip path only where the block changes the width.
        self.skip = (nn.Conv2d(in_channels, out_channels, kernel_size=1)
                     if in_channels != out_channels else nn.Identity())
        self.attn = (SelfAttention(out_channels, num_heads, norm_groups)
                     if attention else nn.Identity())

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [B, in, H, W]; emb [B, emb_dim], already passed through SiLU by the UNet."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.attn(self.skip(x) + h)


class UNet(nn.Module):
    """Noise-prediction UNet: forward(x [B,C,H,W], t [B], class_labels [B] | None,
    x_self_cond [B,C,H,W] | None) -> [B,C,H,W]."""

    def __init__(
        self,
        in_channels: int,  # image channels in and out: 1 grey, 3 RGB
        image_size: int,  # side length of the square input, in pixels
        base_channels: int = 32,  # width of level 0; level i has base_channels * channel_mult[i]
        channel_mult: tuple[int, ...] = (1, 2, 2),  # one entry per resolution level
        num_res_blocks: int = 1,  # residual blocks per level on the down path (+1 on the up path)
        attention_resolutions: tuple[int, ...] = (7,),  # side lengths, in pixels, with attention
        num_heads: int = 4,
        dropout: float = 0.1,  # before the second conv of every residual block
        norm_groups: int = 8,  # GroupNorm groups
        num_classes: int = 0,  # 0: unconditional; >0: labels 0..num_classes-1, num_classes = null
        self_condition: bool = False,  # also read an x0 estimate (Chen et al. 2022): 2C inputs
        gradient_checkpointing: bool = False,  # recompute block activations in the backward pass
    ) -> None:
        super().__init__()
        _check_config(in_channels, image_size, base_channels, channel_mult, num_res_blocks,
                      attention_resolutions, num_heads, dropout, norm_groups, num_classes)
        sizes = feature_map_sizes(image_size, len(channel_mult))
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.self_condition = self_condition
        self.gradient_checkpointing = gradient_checkpointing
        self.base_channels = base_channels
        emb_dim = 4 * base_channels  # DDPM's width for the timestep MLP

        def block(cin: int, cout: int, attention: bool) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, norm_groups, attention, num_heads)

        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # One extra row: index num_classes is the "no label" class that classifier-free guidance
        # trains by dropping labels and samples with as the unconditional branch.
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        inputs = 2 * in_channels if self_condition else in_channels  # x_t, then the x0 estimate
        self.conv_in = nn.Conv2d(inputs, base_channels, kernel_size=3, padding=1)

        # Down path: a flat list of ResBlocks and stride-2 convs; every output is kept as a skip.
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for level, (mult, size) in enumerate(zip(channel_mult, sizes)):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, base_channels * mult, size in attention_resolutions))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, kernel_size=3, stride=2, padding=1))
                skip_channels.append(ch)

        self.mid = nn.ModuleList([block(ch, ch, sizes[-1] in attention_resolutions),
                                  block(ch, ch, attention=False)])

        # Up path: each ResBlock consumes one skip (concatenated on channels), in reverse order.
        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            width = base_channels * channel_mult[level]
            attention = sizes[level] in attention_resolutions
            for _ in range(num_res_blocks + 1):
                self.up.append(block(ch + skip_channels.pop(), width, attention))
                ch = width
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, kernel_size=3, padding=1)))

        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = zero_init(nn.Conv2d(ch, in_channels, kernel_size=3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                x_self_cond: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W]; t [B] timesteps; class_labels [B] long, or None; x_self_cond [B, C, H, W]
        (an x0 estimate), or None.

        For a class-conditional model, None means the null class (label num_classes) for the whole
        batch; a per-sample mix of real and null labels is passed as a tensor. For a
        self-conditioned model, x_self_cond None means zeros (no estimate yet). An unconditional
        model given labels, or a model without self-conditioning given an estimate, raises
        ValueError rather than silently ignoring them.
        """
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))
        if self.class_emb is not None:
            if class_labels is None:
                class_labels = torch.full_like(t, self.num_classes, dtype=torch.long)
            emb = emb + self.class_emb(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional UNet (num_classes=0)")
        emb = F.silu(emb)  # every block's embedding projection starts with SiLU: apply it once here
        if self.self_condition:
            x = torch.cat([x, torch.zeros_like(x) if x_self_cond is None else x_self_cond], dim=1)
        elif x_self_cond is not None:
            raise ValueError("x_self_cond given to a UNet without self-conditioning "
                             "(self_condition=False)")

        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = self.block(layer, h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = self.block(layer, h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = self.block(layer, torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def block(self, layer: ResBlock, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """layer(h, emb), checkpointed when gradient checkpointing is on and gradients are."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, h, emb, use_reentrant=False)
        return layer(h, emb)


def _check_config(in_channels: int, image_size: int, base_channels: int,
                  channel_mult: tuple[int, ...], num_res_blocks: int,
                  attention_resolutions: tuple[int, ...], num_heads: int, dropout: float,
                  norm_groups: int, num_classes: int) -> None:
    """Raise ValueError, naming the offending values and what would work, for an impossible UNet."""
    for name, value in [("in_channels", in_channels), ("image_size", image_size),
                        ("base_channels", base_channels), ("num_res_blocks", num_res_blocks),
                        ("num_heads", num_heads), ("norm_groups", norm_groups)]:
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")
    if any(mult < 1 for mult in channel_mult):
        raise ValueError(f"channel_mult={channel_mult} must hold positive ints")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} must be in [0, 1)")
    if num_classes < 0:
        raise ValueError(f"num_classes={num_classes} must be 0 (unconditional) or positive")
    problem = unet_problem(image_size, base_channels, channel_mult, attention_resolutions,
                           num_heads, norm_groups)
    if problem:
        raise ValueError(problem)


def build_model(params: Params) -> UNet:
    """The UNet described by params.model, sized for what it denoises: params.preprocess's
    images, or in latent space the autoencoder's latents (config.unet_input)."""
    m = params.model
    channels, side = unet_input(params)
    return UNet(
        in_channels=channels,
        image_size=side,
        base_channels=m.base_channels,
        channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        num_heads=m.num_heads,
        dropout=m.dropout,
        norm_groups=m.norm_groups,
        num_classes=m.num_classes,
        self_condition=m.self_condition,
        gradient_checkpointing=m.gradient_checkpointing,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars in the model."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
