"""A temporary project in which the train stage runs as a real process, as under `dvc repro`:
tiny params, tiny random training images, and its own MLflow SQLite store."""

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline.data import ImageSet
from pipeline.model_file import read_model_file
from stages.paths import EMA_MODEL

ROOT = Path(__file__).resolve().parents[1]

PARAMS = {
    "preprocess": {"image_size": 8, "channels": 1},
    "model": {"base_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [4],
              "num_heads": 2, "norm_groups": 4, "num_classes": 0},
    "diffusion": {"num_timesteps": 50},
    "train": {"steps": 120, "batch_size": 8, "warmup_steps": 10, "log_every": 4,
              "checkpoint_every": 20, "sample_every": 40, "grid_images": 4,
              "grid_sampling_steps": 3, "precision": "fp32"},
    "sample": {"num_steps": 4},
    "evaluate": {"kid_subset_size": 5},
}


def make_project(folder: Path, **sections) -> Path:
    """`sections` override PARAMS per section, e.g. train={"lr": 1.0}."""
    folder.mkdir(parents=True)
    params = {section: dict(values) for section, values in PARAMS.items()}
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    images = torch.randint(0, 256, (64, 1, 8, 8), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    ImageSet(images, torch.arange(64) % 2, ("a", "b")).save(folder / "outputs/preprocess/train")
    return folder


def start(project: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}")
    with open(project / "log.txt", "a") as log:  # the child keeps its own copy of the file
        return subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=project, env=env,
                                stdout=log, stderr=subprocess.STDOUT, text=True)


def finish(project: Path) -> str:
    process = start(project)
    assert process.wait(timeout=300) == 0, (project / "log.txt").read_text()
    return (project / "log.txt").read_text()


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def starts(project: Path) -> int:
    """How many times the stage got past its start-up (imports, MLflow) into training."""
    log = project / "log.txt"
    return log.read_text().count("train: MLflow run") if log.exists() else 0


def training_runs(project: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("simple-diffusion")
    return client, client.search_runs([experiment.experiment_id])


def result(project: Path) -> dict:
    """Final weights, EMA weights and the logged loss curve of the project's one MLflow run."""
    client, runs = training_runs(project)
    assert len(runs) == 1, "a resumed training must continue its MLflow run, not start another"
    newest = max((project / "checkpoints").glob("*/*.pt"))
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    return {"model": torch.load(newest, weights_only=True)["model"],
            "ema": read_model_file(project / EMA_MODEL).weights,
            "loss": sorted((m.step, m.value) for m in history),
            "status": runs[0].info.status}
