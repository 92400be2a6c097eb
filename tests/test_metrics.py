"""Domain classifier and metrics: torch-fidelity's FD/KID against an independent computation."""

import urllib.error

import numpy as np
import pytest
import torch
from scipy import linalg

from pipeline import metrics
from pipeline.classifier import (accuracy, load_classifier, predict, save_classifier,
                                 train_classifier)
from pipeline.config import ClassifierParams
from pipeline.data import ImageSet


def bars(n: int, seed: int) -> ImageSet:
    """Two classes that a CNN tells apart at once: a bright horizontal or vertical bar."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 40, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 2
    position = torch.randint(2, 10, (n,), generator=g)
    for i in range(n):
        if labels[i] == 0:
            images[i, 0, position[i], :] = 255
        else:
            images[i, 0, :, position[i]] = 255
    return ImageSet(images, labels, ("horizontal", "vertical"))


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    model = train_classifier(bars(400, 0), ClassifierParams(epochs=3, batch_size=32, lr=0.003,
                                                            feature_dim=16))
    path = tmp_path_factory.mktemp("clf") / "model.pt"
    save_classifier(model, path)
    return path


def test_classifier_learns_and_roundtrips(classifier_file):
    model = load_classifier(classifier_file)
    held_out = bars(200, 1)
    assert accuracy(model, held_out) > 0.95
    again = load_classifier(classifier_file)
    assert torch.equal(predict(model, held_out.images), predict(again, held_out.images))


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """FD of Heusel et al. 2017 eq. (6), written out independently of torch-fidelity."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # singular: constant features
def test_classifier_fd_matches_an_independent_computation(classifier_file):
    a, b = bars(300, 2).images, bars(300, 3).images
    b[:, :, :6] = 0  # blank the top half of the second set: a real difference in distribution
    got = metrics.fid_kid(a, b, extractor=metrics.CLASSIFIER_EXTRACTOR,
                          weights=str(classifier_file), kid_subset_size=100, batch_size=64,
                          seed=0)
    with torch.no_grad():
        features = load_classifier(classifier_file).features
        expected = frechet(features(a).double().numpy(), features(b).double().numpy())
    assert got["fd"] == pytest.approx(expected, rel=1e-4)
    assert got["fd"] > 0.1 and got["kid"] > 0


def test_identical_sets_score_zero(classifier_file, capsys):
    a = bars(200, 4).images
    got = metrics.fid_kid(a, a.clone(), extractor=metrics.CLASSIFIER_EXTRACTOR,
                          weights=str(classifier_file), kid_subset_size=50, batch_size=64, seed=0)
    assert abs(got["fd"]) < 1e-6
    # Progress counts every image read once: it ends exactly at both sets' total.
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("evaluate: FD/KID: image 400/400 ")


def test_class_metrics_by_hand():
    predicted = torch.tensor([0, 0, 0, 1])  # shares 0.75 / 0.25 / 0
    reference = torch.tensor([0, 1, 2, 0, 1, 2])  # shares 1/3 each
    got = metrics.class_metrics(predicted, reference, ("a", "b", "c"))
    assert got["class_tv_distance"] == pytest.approx(0.5 * (5 / 12 + 1 / 12 + 1 / 3))
    assert got["class_coverage"] == pytest.approx(2 / 3)  # c is missing, b has 0.25 >= 1/6
    assert got["class_share/a"] == 0.75 and got["class_share/c"] == 0.0


def test_domain_metrics_floor_is_lower_than_a_bad_generator(classifier_file):
    train, reference = bars(400, 5), bars(300, 6)
    broken = torch.zeros_like(reference.images[:100])  # a generator that outputs black images
    predicted = predict(load_classifier(classifier_file), broken)
    got = metrics.domain_metrics(broken, predicted, train.images, reference.images,
                                 reference.labels, reference.classes, classifier_file,
                                 kid_subset_size=50, batch_size=64, seed=0)
    assert got["floor_classifier_fd"] < 0.1 * got["classifier_fd"]
    assert got["floor_classifier_kid"] < got["classifier_kid"]
    assert got["class_coverage"] == 0.5  # black images all land in one class


def test_inception_offline_is_skipped_with_instructions(monkeypatch, tmp_path):
    """No internet: torch-fidelity's own download fails, evaluate says how to get the weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url",
                        offline)
    images = bars(4, 7).images
    values, skipped = metrics.inception_metrics(images, images, "", kid_subset_size=2,
                                                batch_size=4, seed=0)
    assert values == {}
    assert "no network" in skipped and "evaluate.inception_weights" in skipped
    assert metrics.INCEPTION_FILE in skipped and str(tmp_path) in skipped


def test_missing_local_inception_file_is_named(tmp_path):
    values, skipped = metrics.inception_metrics(bars(4, 8).images, bars(4, 9).images,
                                                str(tmp_path / "nope.pth"), kid_subset_size=2,
                                                batch_size=4, seed=0)
    assert values == {} and "nope.pth" in skipped and "not found" in skipped


@pytest.mark.slow
def test_local_inception_weights_file_is_used(monkeypatch, tmp_path):
    """evaluate.inception_weights reaches torch-fidelity's Inception, which then computes FID/KID.

    The real weights cannot be downloaded here, so the file holds random weights of the right
    shapes; the test checks that exactly that file's tensors are the ones loaded.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    original_load = FeatureExtractorInceptionV3.load_state_dict
    loaded = []
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict",
                        lambda self, state: loaded.append(state))
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    random_net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                             feature_extractor_weights_path=str(empty))
    weights = tmp_path / "random-inception.pth"
    torch.save(random_net.state_dict(), weights)

    def record_and_load(self, state):
        loaded.append(state)
        return original_load(self, state)

    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", record_and_load)
    values, skipped = metrics.inception_metrics(bars(4, 10).images, bars(4, 11).images,
                                                str(weights), kid_subset_size=2, batch_size=4,
                                                seed=0)
    assert skipped is None and set(values) == {"fid", "kid", "kid_std"}
    assert all(np.isfinite(v) for v in values.values())
    expected = random_net.state_dict()
    assert loaded[-1].keys() == expected.keys()
    assert all(torch.equal(loaded[-1][k], expected[k]) for k in expected)


def test_conditional_accuracy_maps_the_models_classes_onto_the_classifiers():
    from pipeline.metrics import conditional_accuracy
    classes = ("cat", "dog", "owl")  # the classifier's (reference) order
    sample_classes = ["dog", "owl"]  # a model trained on two of them: its label 0 is "dog"
    requested = torch.tensor([0, 0, 1, 1, 1])
    predicted = torch.tensor([1, 0, 2, 2, 1])  # right, wrong, right, right, wrong
    assert conditional_accuracy(predicted, requested, sample_classes, classes) == pytest.approx(0.6)
    with pytest.raises(ValueError, match=r"\['emu'\] are not among the evaluation classes"):
        conditional_accuracy(predicted, requested, ["emu", "dog"], classes)
