"""MLflow's embedded SQLite store, made safe to share between processes.

Two things MLflow leaves to the user when several processes use one `mlflow.db`:

* First contact. MLflow's SQLite store sets itself up on first contact (creates its tables, then
  runs its Alembic migrations), and nothing stops two processes from doing that at once: measured
  here with two `MlflowClient`s opening a new store together, 6 runs in 10 failed ("Online
  migration expected to match one row ... 0 found", "no such column") and 1 left a store that no
  later process could open. Our own processes take a file lock first, but `mlflow ui` does not.
  So a new store is built whole in a temporary file and hard-linked into place, which never
  replaces a file: other processes see either no store or a complete one. When another process
  got there first and is still setting the store up, we wait for it instead of joining in.

* Readers holding up writers. MLflow waits up to 20 s for the database lock (`PRAGMA
  busy_timeout`, mlflow/store/db/utils.py), plenty for the milliseconds a write holds it; but in
  SQLite's default rollback-journal mode a write also waits until every open read has ended, so a
  reader (`mlflow ui`, a script, a database browser) holds up training for as long as it reads
  and, past 20 s, fails it with "database is locked". The store is therefore switched to
  write-ahead logging (WAL, https://sqlite.org/wal.html), in which readers and the one writer do
  not wait for each other.
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing
from functools import cache
from pathlib import Path

import mlflow

from pipeline.io import fsync, temp_file_beside

# Another process's set-up changes the schema or holds the write lock all along; a store that
# has seen neither for this long and is still not at MLflow's newest revision is not being set up.
SETUP_QUIET_S = 5.0


def database_path(uri: str) -> Path:
    """The file of a `sqlite:///...` URI."""
    return Path(uri.removeprefix("sqlite:").removeprefix("///"))


def problem(database: Path) -> str | None:
    """Why a store at `database` cannot be written, or None."""
    # MLflow creates missing folders, so the nearest existing one must take new files (SQLite
    # writes its journal beside the database).
    folder = next(f for f in [database.parent, *database.parent.parents] if f.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot create files in {folder}"
    if database.exists() and not os.access(database, os.W_OK):
        return f"{database} is read-only"
    return None


def prepare(database: Path) -> None:
    """Make `database` a complete MLflow store in WAL mode: create it if missing, or wait while
    another process is still setting it up. Callers of one project hold a lock around this."""
    if not database.exists():
        _create(database)
    _wait_for_setup(database)
    with closing(sqlite3.connect(database, timeout=60)) as db:
        db.execute("PRAGMA journal_mode=WAL")  # kept in the file


def _create(database: Path) -> None:
    # MLflow's store and Alembic are imported where needed: 0.7 s that a stage's start-up skips.
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    temp = temp_file_beside(database)
    try:
        # The store sets its tables up when it is made; disposing of its engine closes every
        # connection to the file before it gets its real name.
        SqlAlchemyStore(f"sqlite:///{temp}", temp.parent.as_uri()).engine.dispose()
        fsync(temp)
        os.link(temp, database)
        fsync(database.parent)
    except FileExistsError:
        pass  # another process created it meanwhile: _wait_for_setup waits for it
    finally:
        temp.unlink()


def _wait_for_setup(database: Path) -> None:
    """Return once the store's schema is at MLflow's newest revision, or when nobody has written
    to it for SETUP_QUIET_S (an old store, which MLflow then reports, or an empty file, which
    MLflow then sets up)."""
    last_change, last_seen = time.monotonic(), None
    while True:
        revision, schema_version = _schema_state(database)
        if revision == _newest_revision():
            return
        if schema_version != last_seen or _being_written(database):
            last_change, last_seen = time.monotonic(), schema_version
        elif time.monotonic() - last_change > SETUP_QUIET_S:
            return
        time.sleep(0.1)


def _schema_state(database: Path) -> tuple[str | None, int]:
    """The Alembic revision a store is at (None before its migrations start) and SQLite's
    schema counter, which every table change increments."""
    read_only = f"{database.absolute().as_uri()}?mode=ro"
    with closing(sqlite3.connect(read_only, uri=True, timeout=60)) as db:
        schema_version = db.execute("PRAGMA schema_version").fetchone()[0]
        try:
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.OperationalError:  # no such table yet
            row = None
    return (row[0] if row else None), schema_version


def _being_written(database: Path) -> bool:
    """Whether another connection holds the write lock (a migration can hold it for seconds
    without changing the schema that readers see)."""
    with closing(sqlite3.connect(database, timeout=0, isolation_level=None)) as db:
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            if err.sqlite_errorname != "SQLITE_BUSY":
                raise
            return True
        db.execute("ROLLBACK")
    return False


@cache
def _newest_revision() -> str:
    from alembic.script import ScriptDirectory

    migrations = Path(mlflow.__file__).parent / "store" / "db_migrations"
    return ScriptDirectory(str(migrations)).get_current_head()
