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

import torch
from PIL import Image

from pipeline.classifier import load_classifier, predict
from pipeline.config import Params, SampleParams, load_params
from pipeline.data import ImageSet, load_folder
from pipeline.inference import class_grid
from pipeline.io import save_image, save_json
from pipeline.metrics import conditional_accuracy, domain_metrics, inception_metrics
from pipeline.model_file import TrainedModel, load_ema_model
from pipeline.plots import grid_by_class
from pipeline.tracking import Tracker, connect
from stages import run
from stages.paths import (CLASS_GRID, CLASSIFIER, CLASSIFIER_METRICS, EMA_MODEL, EVALUATE_METRICS,
                          PROGRESSION, REFERENCE_SET, SAMPLE_GRID, SAMPLE_LABELS, SAMPLES,
                          TRAIN_SET)

IMAGES = [SAMPLE_GRID, PROGRESSION, CLASS_GRID]  # logged to MLflow under samples/


def main() -> None:
    params = load_params()
    tracker = connect(params.tracking)  # an unreachable store fails here, not after the metrics
    p = params.evaluate
    train = ImageSet.load(TRAIN_SET)
    reference = ImageSet.load(REFERENCE_SET)
    trained = load_ema_model(EMA_MODEL)
    _, channels, size, _ = reference.images.shape
    samples = load_folder(SAMPLES, size, channels).images
    predicted = predict(load_classifier(CLASSIFIER), samples)
    save_image(samples_by_class(trained, params.sample, samples, predicted,
                                len(reference.classes)), CLASS_GRID)
    common = dict(kid_subset_size=p.kid_subset_size, batch_size=p.batch_size, seed=p.seed)
    metrics = domain_metrics(samples, predicted, train.images, reference.images,
                             reference.labels, reference.classes, CLASSIFIER, **common)
    metrics["classifier_test_accuracy"] = json.loads(
        CLASSIFIER_METRICS.read_text())["test_accuracy"]
    metrics["num_samples"] = len(samples)
    drawn = json.loads(SAMPLE_LABELS.read_text())
    if drawn["labels"] is not None:  # a class-conditional model: did it draw what was asked?
        metrics["conditional_accuracy"] = conditional_accuracy(
            predicted, torch.tensor(drawn["labels"]), drawn["classes"], reference.classes)
    inception, skipped = ({}, "evaluate.inception is false") if not p.inception else \
        inception_metrics(samples, reference.images, p.inception_weights, **common)
    metrics.update(inception)
    save_json(metrics, EVALUATE_METRICS)
    log_to_mlflow(tracker, trained, params, metrics, skipped)
    print(f"evaluate: {json.dumps({k: round(v, 4) for k, v in metrics.items()})}")
    if skipped:
        print(f"evaluate: Inception FID/KID skipped: {skipped}")


def samples_by_class(trained: TrainedModel, p: SampleParams, samples: torch.Tensor,
                     predicted: torch.Tensor, num_classes: int) -> Image.Image:
    """The class grid: drawn per class by a class-conditional model, else grouped by prediction."""
    if trained.model.num_classes:
        return class_grid(trained, p)
    return grid_by_class(samples, predicted, num_classes)


def log_to_mlflow(tracker: Tracker, trained: TrainedModel, params: Params,
                  metrics: dict[str, float], skipped: str | None) -> None:
    settings = {f"{section}.{k}": v for section in ("sample", "evaluate")
                for k, v in asdict(getattr(params, section)).items()}
    status = {"inception_metrics": f"skipped: {skipped}" if skipped else "computed"}
    tracker.record_evaluation(trained.run_id, trained.step, settings, metrics, IMAGES, status)


if __name__ == "__main__":
    run("evaluate", main)
