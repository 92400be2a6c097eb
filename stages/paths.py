"""The files that the DVC stages write and read, named once for all of stages/.

dvc.yaml declares the same paths as each stage's outs and deps; tests/test_dvc_yaml.py checks
that the two agree.
"""

from pathlib import Path

from pipeline.io import project_root

# preprocess: each set a folder of images.npy, labels.npy and classes.json (pipeline.data.ImageSet)
TRAIN_SET = Path("outputs/preprocess/train")
REFERENCE_SET = Path("outputs/preprocess/reference")  # the held-out images evaluate uses

# train_classifier
CLASSIFIER = Path("outputs/classifier/model.pt")
CLASSIFIER_METRICS = Path("outputs/classifier/metrics.json")

# train_autoencoder: the folder holds autoencoder.safetensors (pipeline.autoencoder, written by
# pipeline.autoencoder_training), the training images' latents and the grid of reconstructions,
# or in pixel space only the marker that no autoencoder is needed.
AUTOENCODER_DIR = Path("outputs/autoencoder/model")
AUTOENCODER = AUTOENCODER_DIR / "autoencoder.safetensors"
LATENTS = AUTOENCODER_DIR / "latents"  # the training images' latents: a latent-space model's data
RECONSTRUCTIONS = AUTOENCODER_DIR / "reconstructions.png"
NO_AUTOENCODER = AUTOENCODER_DIR / "not_needed.json"
AUTOENCODER_METRICS = Path("outputs/autoencoder/metrics.json")

# train: pipeline.training.train writes ema.safetensors (model_file.EMA_FILE) into the folder it
# is given
TRAIN_DIR = Path("outputs/train")
EMA_MODEL = TRAIN_DIR / "ema.safetensors"
TRAIN_METRICS = TRAIN_DIR / "metrics.json"
HISTORY = TRAIN_DIR / "history.csv"
LOSS_CURVE = TRAIN_DIR / "loss.png"

# sample
SAMPLES = Path("samples")  # one PNG per sample
SAMPLE_GRID = Path("outputs/sample/grid.png")
PROGRESSION = Path("outputs/sample/progression.png")
SAMPLE_LABELS = Path("outputs/sample/labels.json")

# Not a DVC output: the checkpoints of every run, one folder each (pipeline/checkpoint.py), in
# the main repository, where `dvc exp run` (workspace, --temp, queued) neither removes nor hides
# them, so that each of them resumes an interrupted run as `dvc repro` does.
CHECKPOINTS = project_root() / "checkpoints"
AUTOENCODER_CHECKPOINTS = CHECKPOINTS / "autoencoder"  # a folder per autoencoder run in it

# evaluate
EVALUATE_METRICS = Path("outputs/evaluate/metrics.json")
CLASS_GRID = Path("outputs/evaluate/class_grid.png")
