"""Fault injection with real processes and real signals: the train stage killed and started again.

Each test runs `python -m stages.train` in a temporary project (tiny params, tiny data, its own
MLflow SQLite store) and compares with one uninterrupted run: the final weights, the EMA weights
and the loss curve logged to MLflow must be bit for bit the same, in one MLflow run.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from pipeline.io import save_torch
from pipeline.model_file import read_model_file
from stage_project import (PARAMS, ROOT, finish, make_project, result, start, starts,
                           training_runs, wait_for)
from stages.paths import EMA_MODEL

pytestmark = pytest.mark.slow
def assert_same_run(a: dict, b: dict) -> None:
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["loss"] == b["loss"]  # every logged step once, with the same value
    assert a["status"] == b["status"] == "FINISHED"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    project = make_project(tmp_path_factory.mktemp("faults") / "reference")
    finish(project)
    outcome = result(project)
    assert [s for s, _ in outcome["loss"]] == list(range(4, 121, 4))
    return outcome


def newest_checkpoint_step(project: Path) -> int:
    steps = [int(p.name.split("-")[1])
             for p in (project / "checkpoints").glob("*/step-*.pt")]
    return max(steps, default=0)


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_run(tmp_path, reference):
    """Four kills: one before the first checkpoint (the restart must still continue the same
    MLflow run), three at random moments after checkpoints 20, 60 and 100 (in a step, a log
    call, a sample grid or a write). Progress, not the clock, places them: the CPU may be busy."""
    project = make_project(tmp_path / "killed")
    rng = random.Random(1)
    kills = 0
    for after_checkpoint in (0, 20, 60, 100):
        process = start(project)
        wait_for(lambda: starts(project) > kills or process.poll() is not None)
        wait_for(lambda: newest_checkpoint_step(project) >= after_checkpoint
                 or process.poll() is not None, timeout=300)
        time.sleep(rng.uniform(0.0, 0.5))
        if process.poll() is not None:
            break
        process.kill()
        process.wait()
        kills += 1
    if process.returncode != 0:
        finish(project)
    log = (project / "log.txt").read_text()
    assert kills >= 3 and log.count("resuming at step") >= 2, log
    assert not list((project / "checkpoints").glob("*/.*.tmp"))  # torn ones removed
    assert_same_run(result(project), reference)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_a_checkpoint_and_mark_the_run_killed(tmp_path, reference, signum):
    project = make_project(tmp_path / "stopped")
    process = start(project)
    checkpoints = project / "checkpoints"
    wait_for(lambda: any(checkpoints.glob("*/step-*.pt")) or process.poll() is not None)
    process.send_signal(signum)
    assert process.wait(timeout=120) == 128 + signum
    log = (project / "log.txt").read_text()
    name = signal.Signals(signum).name
    assert f"train: {name} at step" in log and "Traceback" not in log, log
    stopped_at = int(log.split(f"train: {name} at step ")[1].split(":")[0])
    assert 20 <= stopped_at < 120
    assert any(checkpoints.glob(f"*/step-{stopped_at:08d}-*.pt"))  # the step it stopped at
    _, (run,) = training_runs(project)
    assert run.info.status == "KILLED"
    assert f"resuming at step {stopped_at}" in finish(project)
    assert_same_run(result(project), reference)


def test_non_finite_loss_fails_the_run_naming_step_and_causes(tmp_path):
    project = make_project(tmp_path / "diverging",
                           train={"lr": 1e30, "grad_clip": 0.0, "warmup_steps": 0})
    process = start(project)
    assert process.wait(timeout=120) == 1
    log = (project / "log.txt").read_text()
    assert "train: error: training diverged at step 2: loss inf" in log, log
    assert "train.lr = 1e+30" in log and "train.grad_clip = 0" in log and "Traceback" not in log
    _, (run,) = training_runs(project)
    assert run.info.status == "FAILED"
    assert not (project / EMA_MODEL).exists()


def test_a_kill_during_a_write_never_leaves_a_torn_file(tmp_path):
    """A process rewrites a 4 MB tensor file in a loop; SIGKILL lands mid-write many times. The
    file must always load, and hold one whole version."""
    target = tmp_path / "state.pt"
    save_torch({"version": torch.tensor(-1), "data": torch.full((1 << 20,), -1.0)}, target)
    writer = (f"import torch, sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from pipeline.io import save_torch\n"
              "for i in range(10**9):\n"
              f"    save_torch({{'version': torch.tensor(i), 'data': torch.full((1 << 20,), float(i))}}, "
              f"{str(target)!r})\n")
    rng = random.Random(0)
    for _ in range(5):
        process = subprocess.Popen([sys.executable, "-c", writer])
        time.sleep(rng.uniform(2.0, 3.0))  # past the imports, in the middle of the writes
        process.kill()
        process.wait()
        state = torch.load(target, weights_only=True)
        assert torch.equal(state["data"], torch.full((1 << 20,), float(state["version"])))
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["state.pt"]


def stage_processes(project) -> list[int]:
    """Pids of `python -m stages.train` processes running in `project`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            if b"stages.train" in command and Path(os.readlink(entry / "cwd")) == project:
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return pids


def git_project(project: Path) -> tuple[Path, dict[str, str]]:
    """A git repository of this project's files with tiny params and a tiny ImageFolder, and
    the environment to run DVC in it (without the test's DVC_ROOT or tracking URI)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if name != "data.dvc" and (ROOT / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    for label in ("a", "b"):  # a tiny ImageFolder instead of the pinned MNIST
        (project / "data" / label).mkdir(parents=True)
        for i in range(16):
            pixels = torch.randint(0, 256, (8, 8), generator=torch.Generator().manual_seed(i),
                                   dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(project / "data" / label / f"{i}.png")
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in PARAMS.items():
        params[section].update(values)
    params["preprocess"].update(data_dir="data", train_split="", test_split="",
                                max_reference_images=8)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "MLFLOW_TRACKING_URI")}
    # data.dvc pins the images, so that `dvc exp run --temp` checks them out in its copy.
    for command in (["git", "init", "-q"], ["dvc", "add", "-q", "data"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "t"]):
        subprocess.run(command, cwd=project, env=env, check=True)
    return project, env


def test_dvc_repro_after_a_sigkill_resumes_the_same_mlflow_run(tmp_path):
    """The user's view: the train stage is killed under `dvc repro`; `dvc repro` again resumes
    from the checkpoint, in the same MLflow run, and every step is logged once."""
    project, env = git_project(tmp_path / "repo")
    with open(tmp_path / "repro.txt", "w") as log:
        repro = subprocess.Popen(["dvc", "repro", "train"], cwd=project, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    checkpoints = project / "checkpoints"
    wait_for(lambda: any(checkpoints.glob("*/step-*.pt")) or repro.poll() is not None, timeout=300)
    for pid in stage_processes(project):
        os.kill(pid, signal.SIGKILL)
    assert repro.wait(timeout=120) != 0, (tmp_path / "repro.txt").read_text()
    again = subprocess.run(["dvc", "repro", "train"], cwd=project, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming at step" in again.stdout
    client, (run,) = training_runs(project)  # the one run, continued: not a second one
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(4, 121, 4))


def test_dvc_repro_after_a_training_code_edit_trains_again_and_after_a_reporting_edit_does_not(
        tmp_path):
    """Params unchanged: an edit to the code that trains (pipeline/ema.py) re-runs the stage and
    it trains from step 0 in a new MLflow run; an edit to code that only reports
    (pipeline/plots.py) re-runs it too, and it takes its finished run up again."""
    project, env = git_project(tmp_path / "repo")

    def repro_after_editing(file: str) -> str:
        with open(project / file, "a") as source:
            source.write("# edited\n")
        done = subprocess.run(["dvc", "repro", "train"], cwd=project, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Running stage 'train'" in done.stdout
        return done.stdout

    first = repro_after_editing("pipeline/ema.py")  # the first training
    assert "resuming at step" not in first
    retrained = repro_after_editing("pipeline/ema.py")
    assert "a finished run of other code; training again from step 0" in retrained
    assert "resuming at step" not in retrained
    client, runs = training_runs(project)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:  # each trained every step
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(4, 121, 4))
    assert "resuming at step 120" in repro_after_editing("pipeline/plots.py")
    assert len(training_runs(project)[1]) == 2

EXPERIMENT = ["-S", "train.steps=60", "-S", "train.seed=3"]  # an experiment on the baseline


def exp_run(project: Path, env: dict[str, str], *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", "exp", "run", "train", *EXPERIMENT, *options], cwd=project,
                          env=env, capture_output=True, text=True, timeout=600)


def loss_curve(project: Path) -> list[tuple[int, float]]:
    client, (run,) = training_runs(project)  # one run: a resumed one continues, not a second
    assert run.info.status == "FINISHED"
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))


@pytest.fixture(scope="module")
def uninterrupted_experiment(tmp_path_factory):
    project, env = git_project(tmp_path_factory.mktemp("experiment") / "repo")
    done = exp_run(project, env)
    assert done.returncode == 0, done.stdout + done.stderr
    return loss_curve(project), read_model_file(project / EMA_MODEL).weights


@pytest.mark.parametrize("temp", [False, True], ids=["workspace", "temp"])
def test_dvc_exp_run_again_after_ctrl_c_resumes_the_same_run(tmp_path, uninterrupted_experiment,
                                                             temp):
    """The user's view: Ctrl-C (SIGINT to the whole foreground process group) during the train
    stage of `dvc exp run`, then the same `dvc exp run` again: it resumes from the checkpoint,
    in the same MLflow run, and ends bit for bit where the uninterrupted experiment ends. DVC
    puts the baseline's outputs back before an experiment and runs --temp in a copy, so this
    holds only because the checkpoints are not a DVC output."""
    project, env = git_project(tmp_path / "repo")
    options = ["--temp"] if temp else []
    with open(tmp_path / "first.txt", "w") as log:
        first = subprocess.Popen(["dvc", "exp", "run", "train", *EXPERIMENT, *options],
                                 cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    wait_for(lambda: any((project / "checkpoints").glob("*/step-*.pt")) or first.poll() is not None,
             timeout=300)
    os.killpg(first.pid, signal.SIGINT)
    assert first.wait(timeout=120) != 0
    log = (tmp_path / "first.txt").read_text()
    assert "train: SIGINT at step" in log, log
    stopped_at = int(log.split("train: SIGINT at step ")[1].split(":")[0])
    again = exp_run(project, env, *options)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming at step {stopped_at}" in again.stdout + again.stderr
    curve, ema = uninterrupted_experiment
    assert loss_curve(project) == curve  # every step once, with the uninterrupted values
    if not temp:  # a --temp experiment's outputs stay in its DVC experiment, not the workspace
        resumed = read_model_file(project / EMA_MODEL).weights
        assert all(torch.equal(resumed[k], v) for k, v in ema.items())
