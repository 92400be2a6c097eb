"""The team setup of docs/team.md, for real: an MLflow server on PostgreSQL with its artifacts on
S3, a DVC remote on S3, and a parameter sweep through DVC's queue.

PostgreSQL is the one Debian packages (.ci/run installs it where it is missing), started with
initdb and pg_ctl in a temporary folder, listening on 127.0.0.1 only. S3 is moto's server on
127.0.0.1. The train stage runs as `python -m stages.train` in a temporary project with tiny
params and data (tests/stage_project.py). Every server is stopped at the end, also after a failure.
Slow (2-3 minutes on 2 shared cores; MLflow creating its tables takes 15 s), but CI runs it.
"""

import csv
import glob
import hashlib
import io
import math
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import boto3
import psycopg2
import pytest
import yaml
from mlflow.tracking import MlflowClient
from moto.server import ThreadedMotoServer
from PIL import Image
from stage_project import make_project

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # dvc, mlflow
BUCKET = "team"
S3_KEY, S3_SECRET = "testing", "s3-secret-" + secrets.token_hex(4)  # moto takes any credentials
DB_USER, DB_PASSWORD = "mlflow", "pg-secret-" + secrets.token_hex(4)
TRAIN = {"steps": 12, "log_every": 4, "checkpoint_every": 12, "sample_every": 6}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra: str) -> dict[str, str]:
    """This environment without the tracking, DVC and AWS settings a test must not inherit."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DVC_ROOT", "MLFLOW_TRACKING_URI") and not k.startswith("AWS_")}
    # No credentials from an EC2 metadata service: looking for one takes seconds off-cloud.
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", AWS_EC2_METADATA_DISABLED="true",
               **extra)
    return env


def sh(cwd: Path, *command: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env or environment(), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def wait_until(ready, what: str, process: subprocess.Popen, log: Path, timeout: float = 180):
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, f"{what} exited:\n{log.read_text()}"
        assert time.time() < deadline, f"{what} not ready after {timeout} s:\n{log.read_text()}"
        time.sleep(0.5)


# --- S3: moto's server ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3():
    """The endpoint URL of an S3 server on 127.0.0.1 with an empty bucket BUCKET."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        bucket(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


def bucket(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)


def objects(endpoint: str, prefix: str) -> dict[str, bytes]:
    client = bucket(endpoint)
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
            for o in listing}


# --- PostgreSQL: Debian's binaries, run by an unprivileged user -------------------------------

@dataclass(frozen=True)
class Postgres:
    port: int

    def uri(self, database: str) -> str:
        # psycopg2 named explicitly: SQLAlchemy 2.1 reads a plain postgresql:// as psycopg 3.
        return f"postgresql+psycopg2://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        return psycopg2.connect(host="127.0.0.1", port=self.port, user=DB_USER,
                                password=DB_PASSWORD, dbname=database)

    def create_database(self, name: str) -> None:
        with closing(self.connect()) as db:
            db.autocommit = True  # CREATE DATABASE cannot run in a transaction
            db.cursor().execute(f"CREATE DATABASE {name}")

    def query(self, database: str, sql: str, *args) -> list[tuple]:
        with closing(self.connect(database)) as db, db.cursor() as cursor:
            cursor.execute(sql, args)
            return cursor.fetchall()


def unprivileged(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root (CI's user): there, it runs as `nobody`."""
    return ["runuser", "-u", "nobody", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1 whose superuser DB_USER logs in with DB_PASSWORD."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    bin_dir = Path(found[-1]).parent
    # Not under pytest's tmp_path: its folders are private to root, where `nobody` cannot go.
    folder = Path(tempfile.mkdtemp(prefix="test-team-postgres-"))
    (folder / "password").write_text(DB_PASSWORD)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for path in (folder, folder / "password"):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
    data, port = folder / "data", free_port()
    try:
        sh(folder, *unprivileged([str(bin_dir / "initdb"), "-D", str(data), "-U", DB_USER,
                                  f"--pwfile={folder / 'password'}", "--auth-local=trust",
                                  "--auth-host=scram-sha-256", "--no-locale", "-E", "UTF8",
                                  "--no-sync"]))
        # The unix socket goes in the temporary folder, not /var/run/postgresql.
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}"
        sh(folder, *unprivileged([str(bin_dir / "pg_ctl"), "start", "-w", "-D", str(data),
                                  "-l", str(folder / "log"), "-o", options]))
        yield Postgres(port)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(unprivileged([str(bin_dir / "pg_ctl"), "stop", "-w", "-m", "fast",
                                         "-D", str(data)]), timeout=60)
        shutil.rmtree(folder)


# --- The MLflow server ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_server(postgres, s3, tmp_path_factory):
    """`mlflow server` as docs/team.md starts it: runs in PostgreSQL, artifacts in S3."""
    postgres.create_database("mlflow")
    port, log = free_port(), tmp_path_factory.mktemp("mlflow-server") / "log.txt"
    env = environment(AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET,
                      MLFLOW_S3_ENDPOINT_URL=s3)
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", postgres.uri("mlflow"),
               "--artifacts-destination", f"s3://{BUCKET}/mlflow"]
    with open(log, "w") as out:  # its own session: the whole server stops with one signal
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(url + "/health"), "mlflow server", server, log)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def train(project: Path, **env: str) -> tuple[str, str]:
    """Run the train stage in `project`: its output, and the MLflow run id it names."""
    output = sh(project, sys.executable, "-m", "stages.train",
                env=environment(PYTHONPATH=str(ROOT), **env))
    return output, output.split("train: MLflow run ")[1].split()[0]


def test_a_training_run_goes_through_the_server_into_postgresql_and_s3(
        tmp_path, postgres, s3, mlflow_server):
    project = make_project(tmp_path / "project", train=TRAIN)
    output, run_id = train(project, MLFLOW_TRACKING_URI=mlflow_server)
    assert f"train: MLflow run {run_id} in {mlflow_server}" in output

    # Read back through the server, as the MLflow UI and every team member do.
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "12" and run.data.params["model.base_channels"] == "8"
    with open(project / "outputs/train/history.csv") as f:
        written = [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(f)]
    logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert [s for s, _ in logged] == [4, 8, 12]
    assert all(math.isclose(a, b, rel_tol=1e-5) for (_, a), (_, b) in zip(logged, written))
    grids = {a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")}
    assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in grids) == [6, 12]
    downloaded = Path(client.download_artifacts(run_id, min(grids), str(tmp_path)))
    with Image.open(downloaded) as grid:
        grid.load()  # a whole PNG, not a truncated one

    # The run is in PostgreSQL, its images in the S3 bucket, byte for byte.
    assert postgres.query("mlflow", "SELECT r.status, e.name FROM runs r JOIN experiments e "
                          "ON r.experiment_id = e.experiment_id WHERE r.run_uuid = %s",
                          run_id) == [("FINISHED", "simple-diffusion")]
    assert postgres.query("mlflow", "SELECT step, value FROM metrics WHERE run_uuid = %s AND "
                          "key = 'train/loss' ORDER BY step", run_id) == logged
    stored = objects(s3, "mlflow/")
    key = next(k for k in stored if k.endswith(f"/{run_id}/artifacts/{min(grids)}"))
    assert stored[key] == downloaded.read_bytes()


def test_a_stage_writing_straight_to_postgresql_never_shows_the_password(tmp_path, postgres):
    """The backend URI, password included, in params.yaml (tracking.uri): the stage prints it
    and logs it as a param only with the credentials masked (pipeline/tracking.py, redact)."""
    postgres.create_database("direct")
    project = make_project(tmp_path / "project", train=TRAIN)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tracking"] = {"uri": postgres.uri("direct")}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    output, run_id = train(project)
    masked = f"postgresql+psycopg2://***@127.0.0.1:{postgres.port}/direct"
    assert f"train: MLflow run {run_id} in {masked}" in output
    assert DB_PASSWORD not in output
    assert postgres.query("direct", "SELECT status FROM runs WHERE run_uuid = %s",
                          run_id) == [("FINISHED",)]
    assert postgres.query("direct", "SELECT value FROM params WHERE run_uuid = %s AND "
                          "key = 'tracking.uri'", run_id) == [(masked,)]
    assert postgres.query("direct", "SELECT key FROM params WHERE value LIKE %s",
                          f"%{DB_PASSWORD}%") == []


# --- DVC: an S3 remote, and a sweep -----------------------------------------------------------

def git_repo(folder: Path) -> Path:
    folder.mkdir()
    sh(folder, "git", "init", "-q")
    sh(folder, "git", "config", "user.email", "team@example.com")
    sh(folder, "git", "config", "user.name", "team")
    sh(folder, "dvc", "init", "-q")
    return folder


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def set_credentials(repo: Path) -> None:
    """As docs/team.md says: credentials in .dvc/config.local, which git ignores."""
    sh(repo, "dvc", "remote", "modify", "--local", "storage", "access_key_id", S3_KEY)
    sh(repo, "dvc", "remote", "modify", "--local", "storage", "secret_access_key", S3_SECRET)


def test_dvc_push_and_pull_the_data_and_a_model_through_an_s3_remote(tmp_path, s3):
    repo = git_repo(tmp_path / "repo")
    sh(repo, "dvc", "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc")
    sh(repo, "dvc", "remote", "modify", "storage", "endpointurl", s3)
    set_credentials(repo)
    assert S3_SECRET not in (repo / ".dvc/config").read_text()
    sh(repo, "git", "check-ignore", "-q", ".dvc/config.local")  # fails unless ignored

    for digit in range(3):
        for i in range(4):
            image = repo / f"data/train/{digit}/{i}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.frombytes("L", (8, 8), os.urandom(64)).save(image)
    (repo / "models").mkdir()
    (repo / "models/ema.pt").write_bytes(os.urandom(50_000))
    data, model = files(repo / "data"), (repo / "models/ema.pt").read_bytes()
    sh(repo, "dvc", "add", "data", "models/ema.pt")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "data and model")
    assert "14 files pushed" in sh(repo, "dvc", "push")  # 12 images, data/'s listing, the model

    stored = objects(s3, "dvc/files/md5/")
    for content in [*data.values(), model]:  # every file is in the bucket, under its md5
        digest = hashlib.md5(content).hexdigest()
        assert stored[f"dvc/files/md5/{digest[:2]}/{digest[2:]}"] == content

    # Another machine: a clone has the remote but not the credentials, and no cached data.
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / ".dvc/config.local").exists()
    assert not (clone / "data").exists() and not (clone / "models/ema.pt").exists()
    set_credentials(clone)
    sh(clone, "dvc", "pull")
    assert files(clone / "data") == data and (clone / "models/ema.pt").read_bytes() == model
    assert "up to date" in sh(clone, "dvc", "status")


def test_a_grid_sweep_queues_and_runs_every_combination(tmp_path):
    """docs/team.md's sweep, with DVC's grid syntax (`-S key=a,b` per key), on a one-stage
    project whose metric is a known function of the two params."""
    repo = git_repo(tmp_path / "sweep")
    (repo / "params.yaml").write_text("train:\n  lr: 0.002\nmodel:\n  base_channels: 16\n")
    (repo / "score.py").write_text(
        "import json, yaml\n"
        "p = yaml.safe_load(open('params.yaml'))\n"
        "json.dump({'score': p['train']['lr'] * p['model']['base_channels']},"
        " open('metrics.json', 'w'))\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"score": {
        "cmd": "python score.py", "deps": ["score.py"],
        "params": ["train.lr", "model.base_channels"],
        "metrics": [{"metrics.json": {"cache": False}}]}}}))
    sh(repo, "dvc", "repro", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")

    queued = sh(repo, "dvc", "exp", "run", "--queue",
                "-S", "train.lr=1e-3,3e-3", "-S", "model.base_channels=16,32")
    assert queued.count("Queued experiment") == 4, queued
    try:
        sh(repo, "dvc", "queue", "start", "-j", "2")
        wait_for_the_queue(repo)
    finally:
        sh(repo, "dvc", "queue", "stop", "--kill")
    done = experiments(repo)
    assert sorted(done) == [(0.001, 16), (0.001, 32), (0.003, 16), (0.003, 32)], (
        sh(repo, "dvc", "queue", "status") + sh(repo, "dvc", "exp", "show", "--csv"))
    assert all(math.isclose(score, lr * channels) for (lr, channels), score in done.items())


def wait_for_the_queue(repo: Path, timeout: float = 900) -> None:
    """Until `dvc queue status` lists no task Queued or Running, as docs/team.md has users do.
    The timeout only guards against a hung queue: the 4 tiny experiments take 30-60 s on
    2 cores, but twice (in CI, and once here) over 240 s, with `dvc exp show` polled every
    2 s beside the workers; `dvc exp show` can also miss an experiment that is finishing
    (treeverse/dvc#8014), so it is read once, after the queue is done."""
    deadline = time.time() + timeout
    while any(word in (status := sh(repo, "dvc", "queue", "status")).split()
              for word in ("Queued", "Running")):
        assert time.time() < deadline, status
        time.sleep(3)


def experiments(repo: Path) -> dict[tuple[float, int], float]:
    """The finished experiments of `dvc exp show`: (train.lr, model.base_channels) -> score;
    a failed one fails the test."""
    rows = list(csv.DictReader(io.StringIO(sh(repo, "dvc", "exp", "show", "--csv"))))
    assert not [r for r in rows if r["State"] == "Failed"], sh(repo, "dvc", "queue", "status")
    return {(float(r["train.lr"]), int(r["model.base_channels"])): float(r["score"])
            for r in rows if r["State"] == "Success"}
