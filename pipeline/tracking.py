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

`connect` checks the store before anything else happens: an MLflow server must answer within
seconds (MLflow's client would retry for minutes), a SQLite store's folder must be writable.
If not, it raises `TrackingUnavailable` naming the URI, or, with `tracking.required: false`,
says that the run is NOT tracked and returns the base `Tracker`, whose runs record nothing:
`Tracker` and `Run` are the interfaces and the null objects, `MlflowTracker` and `MlflowRun`
the MLflow ones.
URIs are printed and logged only through `redact`, which masks credentials.

The final EMA model is logged as an MLflow model of the training run, and registered, by
pipeline/model_logging.py: this module imports nothing of the model, so that a stage that only
records a run (train_autoencoder) does not depend on the UNet and the sampler.

A stage's run ends FAILED or KILLED when the stage does (pipeline.loop.marked_on_failure).

Queued experiments, `mlflow ui` and scripts share one SQLite store: pipeline/sqlite_store.py
creates it whole and switches it to write-ahead logging, so that none of them breaks another.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request
from PIL import Image
from sqlalchemy.exc import SQLAlchemyError

from pipeline import sqlite_store
from pipeline.config import Params, TrackingParams, flatten
from pipeline.io import project_root
from pipeline.logger import Logger, Relay

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: nests a run under another in the UI
DETAIL_PREFIXES = ("class_share/",)  # evaluation metrics kept on the nested run alone
# The MLflow keys of training's interval metrics. A run page's Model metrics tab shows a section
# per key prefix in alphabetical order, then the unprefixed keys, each section in rows of three
# charts by name; "system/" keys go to its System metrics tab. So a training run's page opens on
# the "train" section (gradient norm, loss, learning rate), and the unprefixed section below it
# begins with the evaluation's class_coverage, class_tv_distance and classifier_fd.
CURVE_KEYS = {"loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr",
              "images_per_s": "system/images_per_s", "seconds": "system/seconds"}
PROGRESS_BARS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # MLflow's switch for its download bars
REACH_TIMEOUT_S = 5  # an MLflow server that has not answered by then counts as unreachable
_USERINFO = re.compile(r"(?<=://)[^/\s?#]*@")  # user:password@ (greedy: a password may hold @)
_QUERY_VALUE = re.compile(r"([?&][^=&#\s]+=)[^&#\s]*")  # ?token=..., &password=...


class TrackingUnavailable(ValueError):
    """The tracking store cannot be used (a ValueError: stages print it as one line)."""


def redact(text: str) -> str:
    """`text` with the user info and query-string values of every URI in it masked."""
    return _QUERY_VALUE.sub(r"\1***", _USERINFO.sub("***@", text))


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


def connect(p: TrackingParams) -> Tracker:
    """The project's tracker. An unusable store raises TrackingUnavailable, unless tracking is
    optional (`tracking.required: false`): then this says so and returns a `Tracker` that
    records nothing."""
    try:
        return MlflowTracker(p)
    except TrackingUnavailable as err:
        if p.required:
            raise
        print(f"tracking: {err}; this run is NOT tracked (tracking.required is false)",
              file=sys.stderr)
        return Tracker(redact(tracking_uri(p)))


def check_store(uri: str) -> None:
    """Raise TrackingUnavailable unless an http(s) store answers, or a SQLite store's folder is
    writable. Other stores (PostgreSQL, file:) answer for themselves at the first request."""
    if uri.startswith(("http:", "https:")):
        problem = _server_problem(uri)
    elif uri.startswith("sqlite:"):
        problem = sqlite_store.problem(sqlite_store.database_path(uri))
    else:
        problem = None
    if problem:
        raise TrackingUnavailable(f"MLflow tracking store {redact(uri)} is unreachable: {problem}")


def _server_problem(uri: str) -> str | None:
    # MLflow's own request helper, so its auth and TLS settings (MLFLOW_TRACKING_TOKEN, ...)
    # apply; without retries, which by default take minutes on a server that is down.
    try:
        response = http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0,
                                backoff_factor=0, timeout=REACH_TIMEOUT_S, raise_on_status=False)
    except MlflowException as err:
        return redact(err.message)
    return f"/health answers HTTP {response.status_code}" if response.status_code >= 500 else None


def check_readable(uri: str) -> None:
    """check_store for a reader, which also needs a SQLite store to exist: MLflow would quietly
    create an empty one and then report every model as missing."""
    check_store(uri)
    if uri.startswith("sqlite:") and not sqlite_store.database_path(uri).is_file():
        raise TrackingUnavailable(f"MLflow tracking store {redact(uri)} does not exist")


class Tracker:
    """Where runs are recorded. This base records nothing: it stands in for the MLflow tracker
    when the store is unreachable and tracking is optional (see `connect`).

    `uri` is the store's URI with credentials masked: the one to print."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def training_run(self, params: Params, run_id: str | None = None) -> Run:
        """Continue run `run_id` (a resumed training) if it exists, else start one."""
        return Run()

    def autoencoder_run(self, params: Params, run_id: str | None = None) -> Run:
        """Continue run `run_id` (a resumed autoencoder training) if it exists, else start one."""
        return Run()

    def evaluation_run(self, parent_id: str | None, params: dict[str, Any]) -> Run:
        """A run for one evaluation, nested under the training run when that run is known."""
        return Run()

    def run(self, run_id: str | None) -> Run | None:
        """The existing run `run_id`, None if there is none."""
        return None

    def record_evaluation(self, training_run_id: str | None, step: int, settings: dict[str, Any],
                          metrics: dict[str, float], images: list[Path], tags: dict[str, str]
                          ) -> Run:
        """A nested run with the evaluation's settings, metrics and images; the training run gets
        the same images and metrics as its latest evaluation, but for the per-class ones
        (`DETAIL_PREFIXES`): a one-point chart per class would push the loss curve out of view
        on its page."""
        evaluation = self.evaluation_run(training_run_id, settings)
        evaluation.log_metrics(metrics, step)
        summary = {k: v for k, v in metrics.items() if not k.startswith(DETAIL_PREFIXES)}
        training = self.run(training_run_id)
        if training:
            training.log_metrics(summary, step)
        for run in filter(None, [evaluation, training]):
            for image in images:
                run.log_artifact(image, "samples")
            run.set_tags(tags)
        evaluation.finish()
        return evaluation


class MlflowTracker(Tracker):
    """An MLflow client bound to the project's store and experiment."""

    def __init__(self, p: TrackingParams) -> None:
        uri = tracking_uri(p)
        check_store(uri)
        super().__init__(redact(uri))
        try:
            self.client, self.experiment_id = self._connect(uri, p.experiment)
        except (MlflowException, SQLAlchemyError, sqlite3.Error, OSError) as err:
            raise TrackingUnavailable(
                f"MLflow tracking store {self.uri} cannot be used: {redact(str(err))}") from None

    def _connect(self, uri: str, experiment: str) -> tuple[MlflowClient, str]:
        # Queued experiments start side by side: the first contact creates the store and the
        # experiment, which two processes must not do at once.
        with FileLock(str(project_root() / ".mlflow.lock"), timeout=600):
            if uri.startswith("sqlite:"):
                with quiet_mlflow():  # "Creating initial MLflow database tables..."
                    sqlite_store.prepare(sqlite_store.database_path(uri))
            client = MlflowClient(uri)
            found = client.get_experiment_by_name(experiment)
            if found is not None:
                return client, found.experiment_id
            local = not uri.startswith(("http:", "https:", "databricks"))  # no server: files here
            location = (project_root() / "mlartifacts").as_uri() if local else None
            # The UI opens an experiment of this kind on its training runs, not its GenAI views.
            kind = {"mlflow.experimentKind": "custom_model_development"}
            return client, client.create_experiment(experiment, artifact_location=location,
                                                    tags=kind)

    def training_run(self, params: Params, run_id: str | None = None) -> Run:
        """Continue run `run_id` (a resumed training) if it exists, else start one."""
        if run_id and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            return MlflowRun(self.client, run_id)
        run = self.client.create_run(self.experiment_id, tags=run_tags(),
                                     run_name=os.environ.get("DVC_EXP_NAME") or None)
        result = MlflowRun(self.client, run.info.run_id)
        result.log_params({**flatten(params), "tracking.uri": redact(params.tracking.uri)})
        return result

    def autoencoder_run(self, params: Params, run_id: str | None = None) -> Run:
        """Continue run `run_id` (a resumed autoencoder training) if it exists, else start one,
        named `<experiment>-autoencoder`, with the autoencoder's params and the images'."""
        if run_id and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            return MlflowRun(self.client, run_id)
        name = os.environ.get("DVC_EXP_NAME") or "train"
        run = self.client.create_run(self.experiment_id, tags=run_tags(),
                                     run_name=f"{name}-autoencoder")
        result = MlflowRun(self.client, run.info.run_id)
        result.log_params({k: v for k, v in flatten(params).items()
                           if k.startswith(("autoencoder.", "preprocess."))})
        return result

    def evaluation_run(self, parent_id: str | None, params: dict[str, Any]) -> Run:
        """A run for one evaluation, nested under the training run when that run is known."""
        tags = run_tags()
        if parent_id and self._exists(parent_id):
            tags[PARENT_TAG] = parent_id
        name = os.environ.get("DVC_EXP_NAME") or "evaluation"
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"{name}-eval")
        result = MlflowRun(self.client, run.info.run_id)
        result.log_params(params)
        return result

    def run(self, run_id: str | None) -> Run | None:
        return MlflowRun(self.client, run_id) if run_id and self._exists(run_id) else None

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True


class Run(Logger):
    """One tracking run: the `Logger` that pipeline.training writes to, and more. This base
    records nothing, and its id is None, so that no checkpoint names a run to continue: it is
    the run of an untracked stage, and of the data-parallel ranks that do not log."""

    id: str | None = None

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def tag(self, key: str) -> str | None:
        return None


class TrainingCurves(Relay):
    """Training's interval metrics under their MLflow keys (`CURVE_KEYS`)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logger.log_metrics({CURVE_KEYS.get(k, k): v for k, v in metrics.items()}, step)

    def last_step(self, key: str) -> int | None:
        return self.logger.last_step(CURVE_KEYS.get(key, key))


class MlflowRun(Run):
    """One MLflow run."""

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

    def tag(self, key: str) -> str | None:
        return self.client.get_run(self.id).data.tags.get(key)

    def param(self, key: str) -> str | None:
        return self.client.get_run(self.id).data.params.get(key)

    def last_step(self, key: str) -> int | None:
        """The largest step logged under `key` in this run, as a metric or an image series
        (log_image names its files images/<key>+step+<step>+...), None if none: a resumed
        training logs only later steps, so each point is in the run exactly once."""
        steps = [m.step for m in self.client.get_metric_history(self.id, key)]
        image = re.compile(rf"images/{re.escape(key)}\+step\+(\d+)\+")
        steps += [int(m.group(1)) for a in self.client.list_artifacts(self.id, "images")
                  if (m := image.match(a.path))]
        return max(steps, default=None)


@contextmanager
def quiet_mlflow() -> Iterator[None]:
    """MLflow's INFO lines, its artifact progress bars and its hint that the input example has
    integer columns (ours never miss values) held back for a while: the stage prints one line
    of its own for what was logged. Warnings and errors still show."""
    logger = logging.getLogger("mlflow")
    level, bars = logger.level, os.environ.get(PROGRESS_BARS)
    logger.setLevel(logging.WARNING)
    os.environ[PROGRESS_BARS] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            yield
    finally:
        logger.setLevel(level)
        if bars is None:
            os.environ.pop(PROGRESS_BARS)
        else:
            os.environ[PROGRESS_BARS] = bars


@contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to `uri` for a while, for the MLflow functions that take
    no client (mlflow.models.Model.log, and the lookup of runs:/ID/MODEL in
    mlflow.artifacts.download_artifacts, which ignores its tracking_uri). Setting it also sets
    MLFLOW_TRACKING_URI, which tracking_uri() reads, so that is put back as it was."""
    environment = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # unset, as the project never sets it
        if environment is not None:
            os.environ["MLFLOW_TRACKING_URI"] = environment
