"""DVC stage `train_classifier`: the small CNN behind the domain metrics (pipeline/classifier.py).

Depends only on the preprocessed images and `classifier.*`, so all experiments share it.
"""

from pathlib import Path

from pipeline.classifier import accuracy, save_classifier, train_classifier
from pipeline.config import load_params
from pipeline.data import ImageSet
from pipeline.io import save_json
from stages import run

OUT = Path("outputs/classifier")


def main() -> None:
    params = load_params().classifier
    train = ImageSet.load("outputs/preprocess/train.pt")
    reference = ImageSet.load("outputs/preprocess/reference.pt")
    model = train_classifier(train, params)
    test_accuracy = accuracy(model, reference)
    save_classifier(model, OUT / "model.pt")
    save_json({"test_accuracy": test_accuracy}, OUT / "metrics.json")
    print(f"train_classifier: held-out accuracy {test_accuracy:.4f}")


if __name__ == "__main__":
    run("train_classifier", main)
