"""The trained EMA model as an MLflow model of its training run, and its registration.

The model is logged in MLflow's "models from code" form: pipeline/mlflow_model.py defines it, the
EMA weights file (pipeline/model_file.py) is its artifact, the pipeline package its code, so
nothing is pickled; it is registered in the model registry under `tracking.registered_model`, a
new version per training.

Apart from pipeline/tracking.py, which records runs: so that a stage that only records a run
(train_autoencoder) imports neither the model file nor the UNet and the sampler behind it, and a
change to them re-runs no autoencoder training.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import Model

from pipeline.model_file import load_ema_model
from pipeline.model_request import example_request
from pipeline.tracking import MlflowRun, Run, global_tracking_uri, quiet_mlflow

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")  # the pyfunc model, "models from code"
# What the logged model needs to load and sample (pinned to this environment's versions):
# MLflow would otherwise infer it by loading the model once more in a subprocess.
MODEL_REQUIREMENTS = ("torch", "numpy", "pandas", "pillow", "pyyaml", "tqdm", "mlflow")


def log_ema_model(run: Run, path: Path, registered_name: str) -> str | None:
    """Log the EMA weights file `path` as `run`'s MLflow model `model`, and register it as a new
    version of `registered_name` ("": do not register); None for a run that records nothing
    (the base `Run` of an untracked stage).

    Returns the URI to load it by: models:/NAME/VERSION, or models:/MODEL_ID unregistered.
    MLflow runs the input example through the model, to record the output's shape, and
    links the run's metrics at the model's training step to the model.
    """
    if not isinstance(run, MlflowRun):
        return None
    trained = load_ema_model(path, torch.device("cpu"))
    example = pd.DataFrame([example_request(trained)])
    requirements = [f"{name}=={version(name).split('+')[0]}" for name in MODEL_REQUIREMENTS]
    # Created here, so that the model lands in the run's experiment (Model.log would put it
    # in the global, default one).
    model = run.client.create_logged_model(
        run.client.get_run(run.id).info.experiment_id, name="model", source_run_id=run.id)
    with global_tracking_uri(run.client.tracking_uri), quiet_mlflow():
        info = Model.log(artifact_path=None, name="model", flavor=mlflow.pyfunc,
                         run_id=run.id, model_id=model.model_id, step=trained.step,
                         python_model=str(MODEL_CODE), artifacts={"ema": str(path)},
                         code_paths=[str(MODEL_CODE.parent)], input_example=example,
                         pip_requirements=requirements,
                         registered_model_name=registered_name or None)
    if info.registered_model_version is None:
        return info.model_uri
    return f"models:/{registered_name}/{info.registered_model_version}"
