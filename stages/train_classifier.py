"""DVC stage `train_classifier`: the small CNN behind the domain metrics (pipeline/classifier.py).

Depends only on the preprocessed images and `classifier.*`, so all experiments share it.
"""

from pipeline.classifier import accuracy, save_classifier, train_classifier
from pipeline.config import load_params
from pipeline.data import ImageSet
from pipeline.io import save_json
from stages import run
from stages.paths import CLASSIFIER, CLASSIFIER_METRICS, REFERENCE_SET, TRAIN_SET


def main() -> None:
    params = load_params().classifier
    train = ImageSet.load(TRAIN_SET)
    reference = ImageSet.load(REFERENCE_SET)
    model = train_classifier(train, params)
    test_accuracy = accuracy(model, reference)
    save_classifier(model, CLASSIFIER)
    save_json({"test_accuracy": test_accuracy}, CLASSIFIER_METRICS)
    print(f"train_classifier: held-out accuracy {test_accuracy:.4f}")


if __name__ == "__main__":
    run("train_classifier", main)
