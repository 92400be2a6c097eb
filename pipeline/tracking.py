"""MLflow tracking: one run per trained model, a nested run per evaluation, one shared store.

The store is MLflow's embedded SQLite database `mlflow.db` in the project root, with artifacts in
`mlartifacts/` beside it, unless a tracking URI is given: MLFLOW_TRACKING_URI in the environment
wins over `tracking.uri` in params.yaml (e.g. a team's MLflow server backed by PostgreSQL).
The project root is DVC_ROOT, which DVC sets for every stage it runs, and which points at the
main repository also for `dvc exp run --temp` and queued experiments, whose stages run in
temporary copies: so every kind of run lands in the one store that `mlflow ui` shows.

The training run holds all params under their dotted `dvc exp run -S` keys, the training curves
and sample grids by step, tags with the git commit and the DVC experiment name (also its run
name). Each evaluation is a nested run that records the sampling settings and the metrics, and
the training run gets the latest evaluation's metrics and final samples grid.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import Params, TrackingParams, flatten

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: nests a run under another in the UI


def project_root() -> Path:
    """The main repository's root: DVC_ROOT under DVC (also in experiment temp copies), else cwd."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri(p: TrackingParams) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or p.uri or \
        f"sqlite:///{project_root() / 'mlflow.db'}"


def run_tags() -> dict[str, str]:
    """Git commit and, under `dvc exp run`, the DVC experiment name and baseline commit."""
    tags = {}
    commit = _git_commit() or os.environ.get("DVC_EXP_BASELINE_REV")
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class Tracker:
    """An MLflow client bound to the project's store and experiment."""

    def __init__(self, p: TrackingParams) -> None:
        self.uri = tracking_uri(p)
        self.client = MlflowClient(self.uri)
        self.experiment_id = self._experiment(p.experiment)

    def _experiment(self, name: str) -> str:
        # Queued experiments start side by side: the first contact creates the database and the
        # experiment, which two processes must not do at once.
        with FileLock(str(project_root() / ".mlflow.lock"), timeout=600):
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                return experiment.experiment_id
            local = self.uri.startswith("sqlite:") or self.uri.startswith("file:")
            location = (project_root() / "mlartifacts").as_uri() if local else None
            return self.client.create_experiment(name, artifact_location=location)

    def training_run(self, params: Params, run_id: str | None = None) -> Run:
        """Continue run `run_id` (a resumed training) if it exists, else start one."""
        if run_id and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            return Run(self.client, run_id)
        run = self.client.create_run(self.experiment_id, tags=run_tags(),
                                     run_name=os.environ.get("DVC_EXP_NAME") or None)
        result = Run(self.client, run.info.run_id)
        result.log_params(flatten(params))
        return result

    def evaluation_run(self, parent_id: str | None, params: dict[str, Any]) -> Run:
        """A run for one evaluation, nested under the training run when that run is known."""
        tags = run_tags()
        if parent_id and self._exists(parent_id):
            tags[PARENT_TAG] = parent_id
        name = os.environ.get("DVC_EXP_NAME") or "evaluation"
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"{name}-eval")
        result = Run(self.client, run.info.run_id)
        result.log_params(params)
        return result

    def run(self, run_id: str | None) -> Run | None:
        return Run(self.client, run_id) if run_id and self._exists(run_id) else None

    def record_evaluation(self, training_run_id: str | None, step: int, settings: dict[str, Any],
                          metrics: dict[str, float], images: list[Path], tags: dict[str, str]
                          ) -> Run:
        """A nested run with the evaluation's settings, metrics and images; the training run gets
        the same metrics and images as its latest evaluation."""
        evaluation = self.evaluation_run(training_run_id, settings)
        for mlflow_run in filter(None, [evaluation, self.run(training_run_id)]):
            mlflow_run.log_metrics(metrics, step)
            for image in images:
                mlflow_run.log_artifact(image, "samples")
            mlflow_run.set_tags(tags)
        evaluation.finish()
        return evaluation

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True


class Run:
    """One MLflow run; also the `Logger` that pipeline.training writes to."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.id = client, run_id

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, float(v), now, step)
                                                for k, v in metrics.items()])

    def log_image(self, image: Image.Image, key: str, step: int) -> None:
        """An image series: the UI shows it by step with a slider."""
        self.client.log_image(self.id, image, key=key, step=step)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.id, str(path), folder)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.id, tags=[RunTag(k, v) for k, v in tags.items()])

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.id, status)
