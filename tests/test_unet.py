"""The UNet: shapes at every supported size, conditioning, gradient flow, config errors, embedding."""

import math
from types import SimpleNamespace

import pytest
import torch

from pipeline.unet import (ResBlock, SelfAttention, UNet, build_model, count_parameters,
                           timestep_embedding)

TINY = dict(base_channels=8, num_res_blocks=1, num_heads=2, dropout=0.0, norm_groups=4)


def tiny_unet(in_channels: int = 1, image_size: int = 28, channel_mult: tuple[int, ...] = (1, 2, 2),
              num_classes: int = 0) -> UNet:
    """A ~70k-parameter UNet with attention at its lowest resolution."""
    lowest = image_size // 2 ** (len(channel_mult) - 1)
    return UNet(in_channels, image_size, channel_mult=channel_mult,
                attention_resolutions=(lowest,), num_classes=num_classes, **TINY)


def perturbed(model: UNet) -> UNet:
    """The model with noise on every weight, as if trained: zero-initialised layers no longer mute
    the conditioning, so a difference in the inputs can show in the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("image_size", [28, 32, 64])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_has_the_input_shape(in_channels: int, image_size: int) -> None:
    model = perturbed(tiny_unet(in_channels, image_size))
    x = torch.randn(2, in_channels, image_size, image_size)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("image_size, channel_mult", [(128, (1, 1, 2, 2)), (256, (1, 1, 2, 2, 2))])
def test_large_images_keep_their_shape(image_size: int, channel_mult: tuple[int, ...]) -> None:
    model = tiny_unet(3, image_size, channel_mult).eval()
    x = torch.randn(1, 3, image_size, image_size)
    assert model(x, torch.tensor([10])).shape == x.shape


def test_fresh_model_predicts_zero_and_fresh_blocks_are_identity() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    assert torch.count_nonzero(tiny_unet()(x, torch.tensor([3, 500]))) == 0

    # Same width in and out, attention on: both residual branches start at zero.
    block = ResBlock(8, 8, emb_dim=32, dropout=0.0, norm_groups=4, attention=True, num_heads=2)
    h = torch.randn(2, 8, 7, 7)
    assert torch.equal(block(h, torch.randn(2, 32)), h)


def test_attention_matches_explicit_softmax() -> None:
    # Catches a head split or transpose that mixes pixels with channels yet keeps the shapes.
    torch.manual_seed(0)
    attn = SelfAttention(channels=8, num_heads=2, norm_groups=4)
    torch.nn.init.normal_(attn.proj.weight)  # undo the zero init, or the branch would vanish
    x = torch.randn(2, 8, 4, 4)
    q, k, v = attn.qkv(attn.norm(x)).reshape(2, 3, 2, 4, 16).unbind(1)  # [B, heads, dim, pixels]
    weights = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(4), dim=-1)  # [B, heads, pix, pix]
    expected = x + attn.proj((v @ weights.transpose(-1, -2)).reshape(2, 8, 4, 4))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_class_labels_change_the_output() -> None:
    model = perturbed(tiny_unet(num_classes=3))
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([100, 100])
    out0 = model(x, t, torch.tensor([0, 0]))
    out1 = model(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(out0, out1, atol=1e-4)

    # The null class: None stands for label num_classes, the extra row of the embedding table.
    null = model(x, t, None)
    assert torch.equal(null, model(x, t, torch.tensor([3, 3])))
    assert not torch.allclose(null, out0, atol=1e-4)


def test_unconditional_model_rejects_labels() -> None:
    model = tiny_unet(num_classes=0)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 1, 28, 28), torch.tensor([5]), torch.tensor([0]))


def test_timestep_changes_the_output() -> None:
    model = perturbed(tiny_unet())
    x = torch.randn(1, 1, 28, 28).expand(2, -1, -1, -1)
    out = model(x, torch.tensor([1, 500]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    # A float timestep is embedded like the integer one (samplers may pass either).
    assert torch.allclose(out, model(x, torch.tensor([1.0, 500.0])))


def test_gradients_reach_every_parameter() -> None:
    # Zero-initialised layers block the gradient to everything before them, so at step 0 only the
    # output conv learns. After two SGD steps every such layer is non-zero, and from then on every
    # parameter must get a gradient; a module left out of forward() would get none.
    torch.manual_seed(0)
    model = tiny_unet(num_classes=3).train()
    x = torch.randn(4, 1, 28, 28)
    t = torch.tensor([1, 10, 100, 999])
    labels = torch.tensor([0, 1, 2, 3])  # 3 is the null class, which must train too

    def backward() -> None:
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x, t, labels), x).backward()

    for _ in range(2):
        backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
    backward()
    starved = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert starved == []
    # Every row of the class table, the null row included, was used.
    assert (model.class_emb.weight.grad.abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("change, message", [
    (dict(channel_mult=(1, 2, 2, 2)), r"image_size=28 .*2\*\*\(levels-1\)=8.* at most 3 levels"),
    (dict(attention_resolutions=(14, 5)), r"\[5\] never occur.* \[28, 14, 7\]"),
    (dict(base_channels=12, norm_groups=8), r"norm_groups=8 must divide base_channels=12"),
    (dict(base_channels=12, norm_groups=4, channel_mult=(1, 2, 3)),
     r"num_heads=8 must divide the 36 channels of the 7 px"),
    (dict(dropout=1.0), r"dropout=1.0"),
])
def test_impossible_configs_raise(change: dict, message: str) -> None:
    config = dict(base_channels=16, channel_mult=(1, 2, 2), attention_resolutions=(7,),
                  num_heads=8, norm_groups=8) | change
    with pytest.raises(ValueError, match=message):
        UNet(1, 28, **config)


def test_build_model_reads_params() -> None:
    params = SimpleNamespace(
        model=SimpleNamespace(space="pixel", base_channels=8, channel_mult=[1, 2],
                              num_res_blocks=2, attention_resolutions=[16], num_heads=2,
                              dropout=0.1, norm_groups=4, num_classes=10, self_condition=False,
                              gradient_checkpointing=True),
        preprocess=SimpleNamespace(image_size=32, channels=3))
    model = build_model(params)
    assert model.class_emb.num_embeddings == 11  # ten classes and the null class
    assert model.gradient_checkpointing
    assert len(model.down) == 2 + 1 + 2  # two blocks per level and one downsampling
    attention = sum(isinstance(m, SelfAttention) for m in model.modules())
    assert attention == 2 + 1 + 3  # 16 px is the lowest level: 2 down blocks, middle, 3 up
    x = torch.randn(2, 3, 32, 32)
    assert model(x, torch.tensor([0, 1])).shape == x.shape
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) > 0


def test_sinusoidal_embedding_matches_the_formula() -> None:
    # dim 4: frequencies 10000**(-0/2) = 1 and 10000**(-1/2) = 0.01; sines first, then cosines.
    emb = timestep_embedding(torch.tensor([0, 1, 250]), dim=4)
    expected = torch.tensor([
        [0.0, 0.0, 1.0, 1.0],
        [0.8414709848, 0.0099998333, 0.5403023059, 0.9999500004],  # sin 1, sin .01, cos 1, cos .01
        [math.sin(250), math.sin(2.5), math.cos(250), math.cos(2.5)],
    ])
    assert torch.allclose(emb, expected, atol=1e-5)
