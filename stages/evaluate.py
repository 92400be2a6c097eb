"""DVC stage `evaluate`: FID/KID and domain metrics of samples/ -> outputs/evaluate/metrics.json.

Also writes outputs/evaluate/class_grid.png, one row of 8 samples per class: a class-conditional
model draws them per class (generate.class_grid, with the sample.* settings); an unconditional
model's samples are grouped by the classifier's predicted class, so a class the model rarely
draws shows as a short or empty row.

Records the evaluation in MLflow as a run nested under the training run (with the sampling
settings as params), and gives the training run these latest metrics and the images.
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from pipeline.classifier import load_classifier, predict
from pipeline.config import Params, SampleParams, load_params
from pipeline.data import ImageSet, load_folder
from pipeline.generate import class_grid, load_ema_model
from pipeline.io import load_torch, save_image, save_json
from pipeline.metrics import conditional_accuracy, domain_metrics, inception_metrics
from pipeline.plots import grid_by_class
from pipeline.tracking import Tracker, Untracked, connect
from stages import run

OUT = Path("outputs/evaluate")
CLASSIFIER = Path("outputs/classifier/model.pt")
LABELS = Path("outputs/sample/labels.json")
IMAGES = [Path("outputs/sample/grid.png"), Path("outputs/sample/progression.png"),
          OUT / "class_grid.png"]  # logged to MLflow under samples/


def main() -> None:
    params = load_params()
    tracker = connect(params.tracking)  # an unreachable store fails here, not after the metrics
    p = params.evaluate
    train = ImageSet.load("outputs/preprocess/train.pt")
    reference = ImageSet.load("outputs/preprocess/reference.pt")
    _, channels, size, _ = reference.images.shape
    samples = load_folder(Path("samples"), size, channels).images
    predicted = predict(load_classifier(CLASSIFIER), samples)
    save_image(samples_by_class(params.sample, samples, predicted, len(reference.classes)),
               OUT / "class_grid.png")
    common = dict(kid_subset_size=p.kid_subset_size, batch_size=p.batch_size, seed=p.seed)
    metrics = domain_metrics(samples, predicted, train.images, reference.images,
                             reference.labels, reference.classes, CLASSIFIER, **common)
    metrics["classifier_test_accuracy"] = json.loads(
        Path("outputs/classifier/metrics.json").read_text())["test_accuracy"]
    metrics["num_samples"] = len(samples)
    drawn = json.loads(LABELS.read_text())
    if drawn["labels"] is not None:  # a class-conditional model: did it draw what was asked?
        metrics["conditional_accuracy"] = conditional_accuracy(
            predicted, torch.tensor(drawn["labels"]), drawn["classes"], reference.classes)
    inception, skipped = ({}, "evaluate.inception is false") if not p.inception else \
        inception_metrics(samples, reference.images, p.inception_weights, **common)
    metrics.update(inception)
    save_json(metrics, OUT / "metrics.json")
    log_to_mlflow(tracker, params, metrics, skipped)
    print(f"evaluate: {json.dumps({k: round(v, 4) for k, v in metrics.items()})}")
    if skipped:
        print(f"evaluate: Inception FID/KID skipped: {skipped}")


def samples_by_class(p: SampleParams, samples: torch.Tensor, predicted: torch.Tensor,
                     num_classes: int) -> Image.Image:
    """The class grid: drawn per class by a class-conditional model, else grouped by prediction."""
    trained = load_ema_model(Path("outputs/train/ema.pt"))
    if trained.model.num_classes:
        return class_grid(trained, p)
    return grid_by_class(samples, predicted, num_classes)


def log_to_mlflow(tracker: Tracker | Untracked, params: Params, metrics: dict[str, float],
                  skipped: str | None) -> None:
    saved = load_torch("outputs/train/ema.pt")
    settings = {f"{section}.{k}": v for section in ("sample", "evaluate")
                for k, v in asdict(getattr(params, section)).items()}
    status = {"inception_metrics": f"skipped: {skipped}" if skipped else "computed"}
    tracker.record_evaluation(saved["run_id"], saved["step"], settings, metrics, IMAGES, status)


if __name__ == "__main__":
    run("evaluate", main)
