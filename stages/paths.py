"""The files that the DVC stages write and read, named once for all of stages/.

dvc.yaml declares the same paths as each stage's outs and deps; tests/test_dvc_yaml.py checks
that the two agree.
"""

from pathlib import Path

# preprocess
TRAIN_SET = Path("outputs/preprocess/train.pt")
REFERENCE_SET = Path("outputs/preprocess/reference.pt")  # the held-out images evaluate uses

# train_classifier
CLASSIFIER = Path("outputs/classifier/model.pt")
CLASSIFIER_METRICS = Path("outputs/classifier/metrics.json")

# train: pipeline.training.train writes ema.pt and checkpoints/ into the folder it is given
TRAIN_DIR = Path("outputs/train")
EMA_MODEL = TRAIN_DIR / "ema.pt"
CHECKPOINTS = TRAIN_DIR / "checkpoints"
TRAIN_METRICS = TRAIN_DIR / "metrics.json"
HISTORY = TRAIN_DIR / "history.csv"
LOSS_CURVE = TRAIN_DIR / "loss.png"

# sample
SAMPLES = Path("samples")  # one PNG per sample
SAMPLE_GRID = Path("outputs/sample/grid.png")
PROGRESSION = Path("outputs/sample/progression.png")
SAMPLE_LABELS = Path("outputs/sample/labels.json")

# evaluate
EVALUATE_METRICS = Path("outputs/evaluate/metrics.json")
CLASS_GRID = Path("outputs/evaluate/class_grid.png")
