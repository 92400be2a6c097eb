"""MLflow tracking against real stores: where runs land, what a run holds, unreachable stores,
masked credentials, and concurrent writers on one SQLite store."""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import Params, TrackingParams, flatten
from pipeline.loop import Interrupted, marked_on_failure
from pipeline.tracking import (PARENT_TAG, REACH_TIMEOUT_S, MlflowTracker, Run, Tracker,
                               TrackingUnavailable, TrainingCurves, check_store, connect, redact,
                               tracking_uri)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("project")


@pytest.fixture
def tracker(root, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lynx")
    return MlflowTracker(TrackingParams(experiment="test"))


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
                                               {"classifier_fd": fd, "class_share/7": 0.1},
                                               [tmp_path / "grid.png"],
                                               {"inception_metrics": "computed"})
    client = MlflowClient(tracker.uri)
    stored = client.get_run(evaluation.id)
    assert stored.data.tags[PARENT_TAG] == parent.id
    assert stored.data.params == {"sample.num_steps": "100"}
    assert stored.data.metrics == {"classifier_fd": 2.5, "class_share/7": 0.1}
    assert stored.info.status == "FINISHED"
    # The latest FD; the per-class shares stay on the evaluation run, off the training run's page.
    assert client.get_run(parent.id).data.metrics == {"classifier_fd": 2.5}
    assert [a.path for a in client.list_artifacts(parent.id, "samples")] == ["samples/grid.png"]
    assert tracker.run("no-such-run") is None


def closed_port() -> int:
    """A loopback port that nothing listens on: bound once by us, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def health_server():
    """A tiny HTTP server on 127.0.0.1 whose /health answers with the status code it is given."""
    servers = []

    def start(status: int) -> int:
        class Health(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(status if self.path == "/health" else 404)
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_redact_masks_user_info_and_query_values():
    assert redact("http://alice:s3cret@mlflow:5000") == "http://***@mlflow:5000"
    assert redact("https://TOKEN@mlflow/") == "https://***@mlflow/"
    assert redact("postgresql://u:p@ss@db/mlflow?sslmode=require&password=x") == \
        "postgresql://***@db/mlflow?sslmode=***&password=***"
    assert redact("https://mlflow/path?token=abc#top") == "https://mlflow/path?token=***#top"
    assert redact("request to http://a:b@h:1/health failed") == \
        "request to http://***@h:1/health failed"
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"  # nothing to hide


def test_unreachable_server_fails_fast_naming_the_masked_uri(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as raised:
        connect(TrackingParams(uri=f"http://alice:s3cret@127.0.0.1:{port}"))
    assert time.monotonic() - started < REACH_TIMEOUT_S  # refused at once, no retries
    assert isinstance(raised.value, ValueError)  # stages print it as one line
    message = str(raised.value)
    assert f"http://***@127.0.0.1:{port} is unreachable" in message
    assert "Connection refused" in message
    assert "s3cret" not in message + capsys.readouterr().err


def test_unreachable_server_with_optional_tracking_trains_on_untracked(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port = closed_port()
    tracker = connect(TrackingParams(uri=f"http://alice:s3cret@127.0.0.1:{port}", required=False))
    err = capsys.readouterr().err
    assert f"http://***@127.0.0.1:{port} is unreachable" in err
    assert "this run is NOT tracked" in err and "s3cret" not in err
    assert type(tracker) is Tracker and tracker.uri == f"http://***@127.0.0.1:{port}"
    run = tracker.training_run(Params())
    run.log_metrics({"loss": 1.0}, step=5)
    run.log_image(Image.new("L", (8, 8)), "sample_grid", step=5)
    run.finish()
    assert run.id is None and run.last_step("loss") is None
    assert tracker.run("any") is None
    assert tracker.record_evaluation(None, 5, {}, {"classifier_fd": 1.0}, [], {}).id is None


def test_server_that_answers_is_reachable_and_one_that_errs_is_not(health_server):
    check_store(f"http://127.0.0.1:{health_server(200)}")  # no error
    port = health_server(503)
    with pytest.raises(TrackingUnavailable, match=rf"127\.0\.0\.1:{port} is unreachable: "
                                                  r"/health answers HTTP 503"):
        check_store(f"http://127.0.0.1:{port}")


def test_sqlite_store_in_a_folder_that_cannot_be_made_is_unreachable(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "a-file").write_text("")  # a file where the store's folder should be
    uri = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"
    with pytest.raises(TrackingUnavailable, match=rf"{uri} is unreachable: cannot create files "
                                                  rf"in {tmp_path / 'a-file'}$"):
        connect(TrackingParams(uri=uri))


def test_credentials_never_reach_the_run_params_nor_the_output(root, monkeypatch, capsys):
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")  # wins over uri
    params = Params(tracking=TrackingParams(uri="https://alice:s3cret@mlflow:5000/?token=t0k3n",
                                            experiment="test"))
    tracker = connect(params.tracking)
    run = tracker.training_run(params)
    print(f"train: MLflow run {run.id} in {tracker.uri}")  # as stages/train.py reports it
    stored = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(run.id).data.params
    assert stored["tracking.uri"] == "https://***@mlflow:5000/?token=***"
    logged = " ".join(stored.values()) + capsys.readouterr().out
    assert "s3cret" not in logged and "t0k3n" not in logged


def test_training_curves_go_to_the_train_section_and_throughput_to_system_metrics(tracker):
    # The run page's layout follows from the keys (tests/test_browser.py checks the page itself).
    run = tracker.training_run(Params())
    curves = TrainingCurves(run)
    row = {"loss": 0.5, "lr": 1e-3, "grad_norm": 2.0, "images_per_s": 64.0, "seconds": 1.25}
    curves.log_metrics(row, 20)
    stored = MlflowClient(tracker.uri).get_run(run.id).data.metrics
    assert stored == {"train/loss": 0.5, "train/lr": 1e-3, "train/grad_norm": 2.0,
                      "system/images_per_s": 64.0, "system/seconds": 1.25}
    assert curves.last_step("loss") == 20  # training's resume check asks by its own name
    assert run.last_step("loss") is None


def test_last_step_is_the_largest_step_logged_for_that_metric(tracker):
    run = tracker.training_run(Params())
    assert run.last_step("loss") is None
    for step in [5, 15, 10]:
        run.log_metrics({"loss": 1.0 / step}, step)
    assert run.last_step("loss") == 15
    assert run.last_step("lr") is None


def test_a_reader_does_not_hold_up_writes(tracker, root):
    """In SQLite's default rollback-journal mode a write waits for every open read (up to
    MLflow's 20 s busy timeout, then "database is locked"); the store runs in WAL mode instead."""
    run = tracker.training_run(Params())
    with closing(sqlite3.connect(root / "mlflow.db")) as reader:
        assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM metrics").fetchall()  # an open read transaction
        started = time.monotonic()
        run.log_metrics({"loss": 0.5}, step=1)
        assert time.monotonic() - started < 2
        reader.execute("COMMIT")
    assert run.last_step("loss") == 1


WRITER = """
import sys
from pipeline.config import Params, TrackingParams
from pipeline.tracking import connect
run = connect(TrackingParams(experiment="concurrent")).training_run(Params())
for step in range(int(sys.argv[1])):
    run.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-3, "grad_norm": 1.0, "images_per_s": 9.0},
                    step)
run.finish()
print(run.id)
"""


@pytest.mark.slow  # five Python processes importing MLflow: about 30 s on 2 cores
def test_four_processes_log_every_point_exactly_once_to_one_fresh_store(tmp_path):
    """Four trainings start at once on a store that does not exist yet (so they also race to
    create it), each logging 100 steps x 4 metrics, while a fifth process keeps reading."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["DVC_ROOT"] = str(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reader = subprocess.Popen([sys.executable, "-c", READER, uri], env=env, cwd=ROOT)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, "100"], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(4)]
    results = [w.communicate(timeout=300) for w in writers]
    reader.kill()
    reader.wait()
    for writer, (out, err) in zip(writers, results):
        assert writer.returncode == 0, err
        assert "database is locked" not in err
    client = MlflowClient(uri)
    for run_id in (out.strip() for out, _ in results):
        assert client.get_run(run_id).info.status == "FINISHED"
        for key in ["loss", "lr", "grad_norm", "images_per_s"]:
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert sorted(steps) == list(range(100)), key


READER = """
import sys, time
from mlflow.tracking import MlflowClient
while True:
    try:
        client = MlflowClient(sys.argv[1])
        for experiment in client.search_experiments():
            for run in client.search_runs([experiment.experiment_id]):
                client.get_metric_history(run.info.run_id, "loss")
    except Exception:
        pass  # the store may not exist yet; this process only makes read traffic
    time.sleep(0.05)
"""


def test_the_train_log_holds_the_stages_lines_not_mlflows_chatter(tmp_path):
    from stage_project import finish, make_project

    log = finish(make_project(tmp_path / "p", train={"steps": 8, "checkpoint_every": 8}))
    assert "train: EMA model logged to MLflow as models:/simple-diffusion/1" in log
    for chatter in (" INFO mlflow", "UserWarning", "Inferred schema contains integer",
                    "Downloading artifacts", "ddim: step"):
        assert chatter not in log, chatter
    assert os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR") is None


def test_quiet_mlflow_puts_the_logger_and_the_environment_back():
    import logging
    import warnings

    from pipeline.tracking import quiet_mlflow

    logger = logging.getLogger("mlflow")
    before = logger.level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_mlflow():
            assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
            assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
            warnings.warn("Hint: Inferred schema contains integer column(s).")
            warnings.warn("a real problem")
    assert [str(w.message) for w in caught] == ["a real problem"]
    assert logger.level == before and "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ


def test_a_stopped_or_failed_stage_marks_its_run_and_a_stop_exits_with_the_signal(capsys):
    class Recorded(Run):
        def __init__(self):
            self.statuses = []

        def finish(self, status="FINISHED"):
            self.statuses.append(status)

    run = Recorded()
    with pytest.raises(SystemExit) as stopped, marked_on_failure(run, "train"):
        raise Interrupted(signal.SIGTERM, 3)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "train: SIGTERM at step 3: checkpoint written" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError), marked_on_failure(run, "train"):
        raise ZeroDivisionError
    with marked_on_failure(run, "train"):
        pass  # a success leaves the run to the stage
    assert run.statuses == ["KILLED", "FAILED"]
