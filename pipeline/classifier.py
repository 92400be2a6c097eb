"""A small CNN classifier of the real images: the feature space of the domain metrics.

Standard FID needs Inception-v3 weights from the internet; this network needs nothing but the
training images. Trained once per data set (its DVC stage does not depend on the diffusion
model, so every experiment reuses it), it gives (a) the class of each generated sample, for the
class histogram, and (b) penultimate-layer features, in which pipeline/metrics.py computes the
Frechet distance and KID exactly as FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) do
in Inception space, but with features that know the domain.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ClassifierParams
from pipeline.data import ImageSet, to_model_range
from pipeline.io import load_torch, save_torch


class Classifier(nn.Module):
    """Three conv layers and two linear layers; `features` is the penultimate activation."""

    def __init__(self, channels: int, num_classes: int, feature_dim: int = 128) -> None:
        super().__init__()
        self.config = dict(channels=channels, num_classes=num_classes, feature_dim=feature_dim)
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            # A 4x4 map keeps where the strokes are (global pooling loses it) at any image size.
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 4 * 4, feature_dim), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, C, H, W] -> features [N, feature_dim]."""
        return self.body(to_model_range(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> class logits."""
        return self.head(self.features(images))


def train_classifier(train: ImageSet, p: ClassifierParams) -> Classifier:
    """Adam with cross-entropy for p.epochs passes over the training images."""
    generator = torch.Generator().manual_seed(p.seed)
    torch.manual_seed(p.seed)
    model = Classifier(train.images.shape[1], len(train.classes), p.feature_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=p.lr)
    model.train()
    for _ in range(p.epochs):
        for index in torch.randperm(len(train), generator=generator).split(p.batch_size):
            loss = F.cross_entropy(model(train.images[index]), train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted class of each uint8 image."""
    model.eval()
    return torch.cat([model(chunk).argmax(1) for chunk in images.split(batch_size)])


def accuracy(model: Classifier, data: ImageSet) -> float:
    return (predict(model, data.images) == data.labels).float().mean().item()


def save_classifier(model: Classifier, path: Path) -> None:
    save_torch({"config": model.config, "weights": model.state_dict()}, path)


def load_classifier(path: str | Path) -> Classifier:
    saved = load_torch(path)
    model = Classifier(**saved["config"])
    model.load_state_dict(saved["weights"])
    return model.eval()
