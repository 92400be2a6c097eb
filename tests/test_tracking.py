"""MLflow tracking against a real SQLite store: where runs land and what a run holds."""

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import Params, TrackingParams, flatten
from pipeline.tracking import PARENT_TAG, Tracker, tracking_uri


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("project")


@pytest.fixture
def tracker(root, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lynx")
    return Tracker(TrackingParams(experiment="test"))


def test_default_store_is_sqlite_in_the_project_root(root, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(TrackingParams()) == f"sqlite:///{root / 'mlflow.db'}"
    assert tracking_uri(TrackingParams(uri="http://mlflow:5000")) == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://team/mlflow")
    assert tracking_uri(TrackingParams(uri="http://mlflow:5000")) == "postgresql://team/mlflow"


def test_training_run_holds_params_tags_curves_and_images(tracker, root):
    run = tracker.training_run(Params())
    run.log_metrics({"loss": 1.0, "lr": 0.1}, step=10)
    run.log_metrics({"loss": 0.5, "lr": 0.2}, step=20)
    run.log_image(Image.new("L", (8, 8)), "sample_grid", step=20)
    run.finish()

    client = MlflowClient(tracker.uri)
    stored = client.get_run(run.id)
    assert stored.info.run_name == "lucky-lynx"  # the DVC experiment name
    assert stored.data.tags["dvc.exp_name"] == "lucky-lynx"
    assert len(stored.data.tags["mlflow.source.git.commit"]) == 40
    assert stored.data.params == {k: str(v) for k, v in flatten(Params()).items()}
    history = client.get_metric_history(run.id, "loss")
    assert [(m.step, m.value) for m in history] == [(10, 1.0), (20, 0.5)]
    artifacts = [a.path for a in client.list_artifacts(run.id, "images")]
    assert any("sample_grid+step+20+" in path for path in artifacts)
    # artifacts live beside the store in the project root, not in the stage's temp copy
    assert client.get_experiment(tracker.experiment_id).artifact_location == \
        (root / "mlartifacts").as_uri()
    assert stored.info.status == "FINISHED"


def test_resumed_training_continues_the_same_run(tracker):
    first = tracker.training_run(Params())
    again = tracker.training_run(Params(), run_id=first.id)
    assert again.id == first.id
    assert tracker.training_run(Params(), run_id="no-such-run").id != first.id


def test_evaluation_is_nested_and_the_training_run_gets_its_latest_metrics(tracker, tmp_path):
    parent = tracker.training_run(Params())
    (tmp_path / "grid.png").write_bytes(b"png")
    for num_steps, fd in [(50, 3.5), (100, 2.5)]:
        evaluation = tracker.record_evaluation(parent.id, 20, {"sample.num_steps": num_steps},
                                               {"classifier_fd": fd}, [tmp_path / "grid.png"],
                                               {"inception_metrics": "computed"})
    client = MlflowClient(tracker.uri)
    stored = client.get_run(evaluation.id)
    assert stored.data.tags[PARENT_TAG] == parent.id
    assert stored.data.params == {"sample.num_steps": "100"}
    assert stored.data.metrics == {"classifier_fd": 2.5}
    assert stored.info.status == "FINISHED"
    assert client.get_run(parent.id).data.metrics["classifier_fd"] == 2.5  # the latest
    assert [a.path for a in client.list_artifacts(parent.id, "samples")] == ["samples/grid.png"]
    assert tracker.run("no-such-run") is None
