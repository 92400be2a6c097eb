"""The shared SQLite store: created whole, in WAL mode, and never set up by two processes at once
(MLflow's own first-contact set-up breaks when two processes run it together)."""

import os
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from mlflow.store.db.utils import _get_latest_schema_revision
from mlflow.tracking import MlflowClient

from pipeline import sqlite_store
from pipeline.config import TrackingParams
from pipeline.tracking import MlflowTracker, TrackingUnavailable

ROOT = Path(__file__).resolve().parents[1]


def revision_and_journal_mode(database: Path) -> tuple[str, str]:
    with closing(sqlite3.connect(database)) as db:
        revision = db.execute("SELECT version_num FROM alembic_version").fetchone()[0]
        return revision, db.execute("PRAGMA journal_mode").fetchone()[0]


def test_a_new_store_appears_complete_in_wal_mode_with_no_temp_file_left(tmp_path):
    database = tmp_path / "store" / "mlflow.db"
    sqlite_store.prepare(database)
    # MLflow's own idea of its newest schema, not the one prepare() computes
    assert revision_and_journal_mode(database) == (_get_latest_schema_revision(), "wal")
    assert [p.name for p in database.parent.iterdir()] == ["mlflow.db"]
    umask = os.umask(0)
    os.umask(umask)
    assert database.stat().st_mode & 0o777 == 0o666 & ~umask
    assert MlflowClient(f"sqlite:///{database}").search_experiments()[0].name == "Default"


def test_a_relative_path_is_a_store_in_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # tracking.uri: sqlite:///mlflow.db
    database = sqlite_store.database_path("sqlite:///mlflow.db")
    sqlite_store.prepare(database)
    sqlite_store.prepare(database)  # now an existing one
    assert revision_and_journal_mode(tmp_path / "mlflow.db") == (_get_latest_schema_revision(), "wal")


def test_a_store_that_appears_while_one_is_built_is_kept(tmp_path):
    database = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{database}")
    kept = client.create_experiment("made by another process")
    sqlite_store._create(database)  # lost the race: its own build is thrown away
    assert client.get_experiment(kept).name == "made by another process"
    assert [p.name for p in tmp_path.iterdir()] == ["mlflow.db"]


# MLflow's first-contact set-up, as `mlflow ui` runs it, paused for 3 s after its 30th migration
# (holding the write lock, as it does between some migrations), so that the test finds the store
# half set up.
SLOW_SETUP = """
import sys, time
import alembic.runtime.migration as migration
from mlflow.tracking import MlflowClient
record_step = migration.HeadMaintainer.update_to_step
steps = 0
def record_step_then_pause(self, step):
    global steps
    record_step(self, step)
    steps += 1
    if steps == 30:
        time.sleep(3)
migration.HeadMaintainer.update_to_step = record_step_then_pause
MlflowClient(sys.argv[1]).search_experiments()
"""


@pytest.mark.slow  # a second Python process importing MLflow: 5-10 s
def test_a_store_another_process_is_setting_up_is_waited_for_not_joined(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    database = tmp_path / "mlflow.db"
    other = subprocess.Popen([sys.executable, "-c", SLOW_SETUP, f"sqlite:///{database}"],
                             stderr=subprocess.PIPE, text=True)
    while not database.exists() or sqlite_store._schema_state(database)[0] is None:
        assert other.poll() is None, other.stderr.read()
        time.sleep(0.01)
    assert sqlite_store._schema_state(database)[0] != _get_latest_schema_revision()  # half set up

    tracker = MlflowTracker(TrackingParams(experiment="after the other"))  # waits, then opens it
    assert revision_and_journal_mode(database) == (_get_latest_schema_revision(), "wal")
    assert other.wait(timeout=120) == 0, other.stderr.read()
    assert tracker.client.get_experiment(tracker.experiment_id).name == "after the other"


def test_an_old_store_nobody_is_changing_is_left_to_mlflow_which_names_the_upgrade(
        tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sqlite_store, "SETUP_QUIET_S", 0.5)
    database = tmp_path / "mlflow.db"
    sqlite_store.prepare(database)
    with closing(sqlite3.connect(database)) as db, db:
        db.execute("UPDATE alembic_version SET version_num = '0584bdc529eb'")  # an old one
    with pytest.raises(TrackingUnavailable, match="mlflow db upgrade"):
        MlflowTracker(TrackingParams(experiment="test"))
