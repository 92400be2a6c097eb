"""Sample-quality metrics, all computed by torch-fidelity: FID and KID in two feature spaces.

- Standard FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) with torch-fidelity's
  Inception-v3 ("inception-v3-compat", the TF-FID network). Its weights download on first use,
  or come from a local file (`evaluate.inception_weights`), or from torch's hub cache. Offline
  and without a file, the metrics are skipped with instructions, never a failure.
- The same two statistics in the feature space of the project's own classifier
  (pipeline/classifier.py), registered as a torch-fidelity feature extractor. These need no
  download, and the "floor" (real training images in place of samples, at the same count)
  shows what a perfect model would score. The autoencoder's stage scores its reconstructions of
  the same images (`reconstruction_metrics`): the floor of a latent model.
- The class histogram of the samples under that classifier: how evenly they cover the classes.

Each FD/KID shows its progress (pipeline/progress.py) by the images its feature extractor has
read: the Inception network takes minutes on a CPU.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from pipeline.classifier import load_classifier
from pipeline.device import default_device
from pipeline.progress import Progress

CLASSIFIER_EXTRACTOR = "simple-diffusion-classifier"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


class Images(Dataset):
    """uint8 images [N, C, H, W] as torch-fidelity reads them; grey becomes RGB for Inception.

    Reading image i moves `progress` to offset + i + 1: torch-fidelity reads the images in
    order, in this process (save_cpu_ram), after one look at image 0 to check its type.
    """

    def __init__(self, images: torch.Tensor, rgb: bool = False,
                 progress: Progress | None = None, offset: int = 0) -> None:
        self.images = images.expand(-1, 3, -1, -1) if rgb and images.shape[1] == 1 else images
        self.progress, self.offset = progress, offset

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.progress is not None:
            self.progress.update(self.offset + i + 1)
        return self.images[i]


class ClassifierFeatures(torch_fidelity.FeatureExtractorBase):
    """The classifier's penultimate layer as a torch-fidelity feature extractor.

    torch-fidelity builds it by name with the keyword arguments of calculate_metrics: the
    classifier file comes in as `feature_extractor_weights_path`.
    """

    def __init__(self, name: str, features_list: list[str],
                 feature_extractor_weights_path: str | None = None, **kwargs) -> None:
        super().__init__(name, features_list)
        self.classifier = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "features"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> None:
        return None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.classifier.features(images).double(),)


if CLASSIFIER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(CLASSIFIER_EXTRACTOR, ClassifierFeatures)


def fid_kid(samples: torch.Tensor, reference: torch.Tensor, *, extractor: str,
            weights: str | None, kid_subset_size: int, batch_size: int, seed: int,
            desc: str = "FD/KID") -> dict[str, float]:
    """Frechet distance and KID (mean, std over subsets) between two uint8 image sets; the
    progress bar `desc` counts the images read."""
    rgb = extractor != CLASSIFIER_EXTRACTOR
    progress = Progress(len(samples) + len(reference), f"evaluate: {desc}", unit="image")
    result = torch_fidelity.calculate_metrics(
        input1=Images(samples, rgb, progress),
        input2=Images(reference, rgb, progress, offset=len(samples)),
        fid=True, kid=True,
        feature_extractor=extractor, feature_extractor_weights_path=weights,
        kid_subset_size=min(kid_subset_size, len(samples), len(reference)),
        batch_size=batch_size, cuda=default_device().type == "cuda", rng_seed=seed,
        cache=False,  # torch-fidelity's feature cache is keyed by a name, not the images
        save_cpu_ram=True, verbose=False)  # save_cpu_ram: no DataLoader worker processes
    progress.close()
    return {"fd": result["frechet_inception_distance"],
            "kid": result["kernel_inception_distance_mean"],
            "kid_std": result["kernel_inception_distance_std"]}


def inception_metrics(samples: torch.Tensor, reference: torch.Tensor, weights: str, **kwargs
                      ) -> tuple[dict[str, float], str | None]:
    """(FID/KID, None), or ({}, why they were skipped) when the Inception weights are missing."""
    if weights and not Path(weights).is_file():
        return {}, (f"evaluate.inception_weights = '{weights}': file not found. "
                    f"{how_to_get_inception()}")
    try:
        values = fid_kid(samples, reference, extractor="inception-v3-compat",
                         weights=weights or None, desc="Inception FID/KID", **kwargs)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        return {}, f"the Inception-v3 weights could not be downloaded ({err}). " \
                   f"{how_to_get_inception()}"
    return {"fid": values["fd"], "kid": values["kid"], "kid_std": values["kid_std"]}, None


def how_to_get_inception() -> str:
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return (f"To compute FID/KID offline, get {INCEPTION_FILE} (95,628,359 bytes, sha256 "
            "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2, from the "
            "torch-fidelity GitHub releases) and either set evaluate.inception_weights to its "
            f"path or put it at {hub}; or run once with internet access")


def class_metrics(predicted: torch.Tensor, reference_labels: torch.Tensor,
                  classes: tuple[str, ...]) -> dict[str, float]:
    """The samples' class shares against the reference set's.

    class_tv_distance: total variation distance between the two class distributions (0 = same
    shares, 1 = disjoint). class_coverage: fraction of classes that get at least half of their
    reference share, i.e. are not (nearly) missing from the samples.
    """
    k = len(classes)
    p = torch.bincount(predicted, minlength=k).double() / len(predicted)
    q = torch.bincount(reference_labels, minlength=k).double() / len(reference_labels)
    metrics = {"class_tv_distance": 0.5 * (p - q).abs().sum().item(),
               "class_coverage": (p >= 0.5 * q).double().mean().item()}
    metrics.update({f"class_share/{name}": p[i].item() for i, name in enumerate(classes)})
    return metrics


def conditional_accuracy(predicted: torch.Tensor, requested: torch.Tensor, sample_classes: list[str],
                         classes: tuple[str, ...]) -> float:
    """The share of samples that the domain classifier assigns to the class they were drawn
    for (Ho & Salimans 2022 report the Inception-classifier analogue, sec. 4). `requested`
    indexes the model's `sample_classes`, `predicted` the classifier's `classes`."""
    unknown = sorted(set(sample_classes) - set(classes))
    if unknown:
        raise ValueError(f"the model's classes {unknown} are not among the evaluation classes")
    to_reference = torch.tensor([classes.index(name) for name in sample_classes])
    return (predicted == to_reference[requested]).double().mean().item()


def floor_images(train_images: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """The floor's real images: `count` training images (all, if there are fewer) drawn at random
    by `seed`. evaluate's floor and the autoencoder's reconstruction floor take the same ones."""
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))
    return train_images[pick[:count]]


def classifier_settings(classifier_path: Path, kid_subset_size: int, batch_size: int, seed: int
                        ) -> dict:
    """fid_kid's arguments for the classifier's feature space."""
    return dict(extractor=CLASSIFIER_EXTRACTOR, weights=str(classifier_path),
                kid_subset_size=kid_subset_size, batch_size=batch_size, seed=seed)


def floor_metrics(images: torch.Tensor, reference_images: torch.Tensor, **settings
                  ) -> dict[str, float]:
    """Classifier-space FD/KID of real training images (floor_images): a perfect model's."""
    floor = fid_kid(images, reference_images, desc="classifier FD/KID floor", **settings)
    return {"floor_classifier_fd": floor["fd"], "floor_classifier_kid": floor["kid"]}


def domain_metrics(samples: torch.Tensor, predicted: torch.Tensor, train_images: torch.Tensor,
                   reference_images: torch.Tensor, reference_labels: torch.Tensor,
                   classes: tuple[str, ...], classifier_path: Path, kid_subset_size: int,
                   batch_size: int, seed: int) -> dict[str, float]:
    """Classifier-space FD/KID of the samples and of the floor (as many training images as
    samples), plus the class histogram of `predicted`, the classifier's classes of the samples
    (pipeline.classifier.predict)."""
    settings = classifier_settings(classifier_path, kid_subset_size, batch_size, seed)
    generated = fid_kid(samples, reference_images, desc="classifier FD/KID", **settings)
    floor = floor_metrics(floor_images(train_images, len(samples), seed), reference_images,
                          **settings)
    return {"classifier_fd": generated["fd"], "classifier_kid": generated["kid"],
            "classifier_kid_std": generated["kid_std"], **floor,
            **class_metrics(predicted, reference_labels, classes)}


def reconstruction_metrics(reconstructions: torch.Tensor, originals: torch.Tensor,
                           reference_images: torch.Tensor, classifier_path: Path,
                           kid_subset_size: int, batch_size: int, seed: int) -> dict[str, float]:
    """Classifier-space FD/KID of an autoencoder's reconstructions (uint8) of the floor's images
    `originals`, the best a latent model can reach, beside the floor of those images."""
    settings = classifier_settings(classifier_path, kid_subset_size, batch_size, seed)
    reconstructed = fid_kid(reconstructions, reference_images,
                            desc="classifier FD/KID of the reconstructions", **settings)
    return {"reconstruction_classifier_fd": reconstructed["fd"],
            "reconstruction_classifier_kid": reconstructed["kid"],
            **floor_metrics(originals, reference_images, **settings)}
