"""End to end: the real `dvc repro`, `dvc exp run` (workspace, --temp, queued) and MLflow.

The repository is copied to a temporary folder with tiny params, its data comes from the
offline mirror (SIMPLE_DIFFUSION_MIRROR, as CI names it), and every command is the one a user
types. Slow (a few minutes), but CI runs it.
"""

import hashlib
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from dvc.utils.hydra import apply_overrides
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.classifier import load_classifier, predict
from pipeline.fetch import MIRROR_ENV
from pipeline.model_file import read_model_file
from pipeline.tracking import PARENT_TAG

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STAGES = ["preprocess", "train_classifier", "train_autoencoder", "train", "sample", "evaluate"]
TINY = {
    "preprocess": {"max_train_images": 2000, "max_reference_images": 300},
    "model": {"base_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [14],
              "num_heads": 2, "norm_groups": 4},
    "train": {"steps": 20, "batch_size": 16, "log_every": 5, "checkpoint_every": 10,
              "sample_every": 10, "grid_images": 4, "grid_sampling_steps": 3},
    "sample": {"num_images": 30, "batch_size": 15, "num_steps": 4},
    "classifier": {"epochs": 1},
    "evaluate": {"kid_subset_size": 20},
}
# A tiny latent experiment: 28 px digits -> 14 px latents (factor 2), which TINY's UNet fits.
LATENT = {"model.space": "latent", "autoencoder.factor": 2, "autoencoder.channel_mult": "[1,2]",
          "autoencoder.base_channels": 8, "autoencoder.norm_groups": 4, "autoencoder.steps": 20,
          "autoencoder.batch_size": 16, "autoencoder.log_every": 5,
          "autoencoder.checkpoint_every": 10, "autoencoder.eval_images": 50,
          "autoencoder.grid_images": 4}
FLOOR = ["reconstruction_classifier_fd", "reconstruction_classifier_kid", "floor_classifier_fd",
         "floor_classifier_kid"]


def sh(project: Path, *command: str, timeout: float = 900) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "MLFLOW_TRACKING_URI")}
    if env.get(MIRROR_ENV):  # a relative mirror path means: relative to this repository
        env[MIRROR_ENV] = str((ROOT / env[MIRROR_ENV]).resolve())
    env["TORCH_HOME"] = str(project.parent / "torch-home")  # no cached Inception weights
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    mirror = os.environ.get(MIRROR_ENV)
    if not mirror:
        pytest.skip(f"{MIRROR_ENV} names no offline data mirror (CI sets it)")
    project = tmp_path_factory.mktemp("e2e") / "project"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(project, "git", "init", "-q")
    sh(project, "git", "config", "user.email", "e2e@example.com")
    sh(project, "git", "config", "user.name", "e2e")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "tiny params")
    sh(project, "python", "-m", "stages.get_data")
    return project


@pytest.fixture(scope="module")
def first_repro(project):
    output = sh(project, "dvc", "repro")
    # As a user does: commit the lock file, so experiments (--temp and queued ones start from
    # the last commit) know what is already computed.
    sh(project, "git", "add", "dvc.lock")
    sh(project, "git", "commit", "-qm", "dvc repro")
    return output


def mlflow_runs(project: Path):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("simple-diffusion")
    runs = client.search_runs([experiment.experiment_id])
    training = [r for r in runs if PARENT_TAG not in r.data.tags]
    evaluations = [r for r in runs if PARENT_TAG in r.data.tags]
    return client, training, evaluations


def test_repro_runs_every_stage_and_writes_finite_metrics(project, first_repro):
    assert ran(first_repro) == STAGES
    assert "Inception FID/KID skipped" in first_repro  # offline: said, not failed
    assert len(list((project / "samples").glob("*.png"))) == 30
    for out in ["outputs/train/ema.safetensors", "outputs/sample/grid.png",
                "outputs/sample/progression.png", "outputs/classifier/model.pt"]:
        assert (project / out).is_file(), out
    checkpoints = sorted((project / "checkpoints").glob("*/step-*.pt"))
    assert [p.name.split("-")[1] for p in checkpoints] == ["00000010", "00000020"]
    evaluation = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    for key in ["classifier_fd", "classifier_kid", "floor_classifier_fd", "class_coverage",
                "class_tv_distance", "classifier_test_accuracy"]:
        assert math.isfinite(evaluation[key]), key
    assert evaluation["num_samples"] == 30
    train = json.loads((project / "outputs/train/metrics.json").read_text())
    assert train["steps"] == 20 and math.isfinite(train["final_loss"])
    history = (project / "outputs/train/history.csv").read_text().splitlines()
    assert history[0].startswith("step,loss") and len(history) == 1 + 4


def test_mlflow_holds_the_training_run(project, first_repro):
    client, training, evaluations = mlflow_runs(project)
    assert len(training) == 1 and len(evaluations) == 1
    run = training[0]
    assert run.data.params["train.steps"] == "20" and run.data.params["model.base_channels"] == "8"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [5, 10, 15, 20]
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("sample_grid+step+10+" in p for p in images)
    assert any("sample_grid+step+20+" in p for p in images)
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert "samples/grid.png" in samples
    assert math.isfinite(run.data.metrics["classifier_fd"])  # its latest evaluation
    assert evaluations[0].data.tags[PARENT_TAG] == run.info.run_id
    assert run.data.tags["inception_metrics"].startswith("skipped")
    (version,) = client.search_model_versions("name='simple-diffusion'")  # the EMA model
    assert version.run_id == run.info.run_id and int(version.version) == 1
    assert run.data.tags["ema_model_uri"] == "models:/simple-diffusion/1"


def test_second_repro_does_nothing(project, first_repro):
    output = sh(project, "dvc", "repro")
    assert ran(output) == [] and "up to date" in output


def test_exp_run_on_a_sample_param_reruns_only_sample_and_evaluate(project, first_repro):
    output = sh(project, "dvc", "exp", "run", "-n", "more-steps", "-S", "sample.num_steps=6")
    assert ran(output) == ["sample", "evaluate"]
    _, training, evaluations = mlflow_runs(project)
    assert len(training) == 1  # no new model: the evaluation joins the same training run
    latest = max(evaluations, key=lambda r: r.info.start_time)
    assert latest.data.params["sample.num_steps"] == "6"
    assert latest.info.run_name == "more-steps-eval"
    assert latest.data.tags["dvc.exp_name"] == "more-steps"


def test_temp_and_queued_experiments_land_in_the_same_store(project, first_repro):
    """--temp re-samples into the existing training run; two queued trainings, run at the same
    time, both finish, each with every logged point of its curves in the one store, once."""
    _, _, before = mlflow_runs(project)
    sh(project, "dvc", "exp", "run", "--temp", "-S", "sample.seed=1")
    _, training, evaluations = mlflow_runs(project)
    assert len(training) == 1 and len(evaluations) == len(before) + 1
    assert max(evaluations, key=lambda r: r.info.start_time).data.params["sample.seed"] == "1"
    seeds = ["1", "2"]
    for seed in seeds:
        sh(project, "dvc", "exp", "run", "--queue", "-S", f"train.seed={seed}")
    sh(project, "dvc", "queue", "start", "-j", "2")
    deadline = time.time() + 1800
    while time.time() < deadline:
        status = sh(project, "dvc", "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Failed" not in status, status
    assert status.count("Success") == len(seeds), status
    client, training, evaluations = mlflow_runs(project)
    queued = [r for r in training if r.data.params["train.seed"] != "0"]
    assert sorted(r.data.params["train.seed"] for r in queued) == seeds
    for run in queued:
        assert run.info.status == "FINISHED"
        for key in ["train/loss", "train/lr", "train/grad_norm", "system/images_per_s"]:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == [5, 10, 15, 20], (run.data.params["train.seed"], key, steps)
        nested = [e for e in evaluations if e.data.tags[PARENT_TAG] == run.info.run_id]
        assert len(nested) == 1
    versions = client.search_model_versions("name='simple-diffusion'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in training)
    assert not (project / ".dvc" / "tmp" / "exps" / "mlflow.db").exists()


def test_guided_class_conditional_experiment_scores_the_classes_it_asked_for(project, first_repro):
    """A class-conditional model sampled with guidance: labels.json says which class each sample
    was asked to be, and evaluate's conditional_accuracy is the share that the domain classifier
    puts in that class, recomputed here from the PNGs."""
    output = sh(project, "dvc", "exp", "run", "-n", "guided", "-S", "model.num_classes=10",
                "-S", "train.cond_drop_prob=0.1", "-S", "sample.guidance_scale=2")
    assert ran(output) == ["train", "sample", "evaluate"]
    drawn = json.loads((project / "outputs/sample/labels.json").read_text())
    assert drawn["classes"] == [str(digit) for digit in range(10)]
    assert len(drawn["labels"]) == TINY["sample"]["num_images"]
    # The sample stage names its PNGs in drawing order: sorted files match the labels.
    pngs = sorted((project / "samples").glob("*.png"))
    samples = torch.stack([torch.from_numpy(np.array(Image.open(png)))[None] for png in pngs])
    predicted = predict(load_classifier(project / "outputs/classifier/model.pt"), samples)
    expected = (predicted == torch.tensor(drawn["labels"])).float().mean().item()
    metrics = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    assert metrics["conditional_accuracy"] == pytest.approx(expected)
    _, _, evaluations = mlflow_runs(project)
    latest = max(evaluations, key=lambda r: r.info.start_time)
    assert latest.data.params["sample.guidance_scale"] == "2.0"
    assert latest.data.metrics["conditional_accuracy"] == pytest.approx(expected)


def test_latent_experiment_trains_its_autoencoder_once_and_samples_decoded_images(project,
                                                                                 first_repro):
    """Latent diffusion end to end (Rombach et al. 2022): the autoencoder's own MLflow run beside
    the latent model's, decoded 28 px samples, a model file that carries the autoencoder; then a
    diffusion param's change is one of the train stage's deps, not the autoencoder's. Last in the
    module: it leaves latent params in the workspace, and its autoencoder run is not a diffusion
    model's."""
    _, _, before = mlflow_runs(project)
    options = [word for key, value in LATENT.items() for word in ("-S", f"{key}={value}")]
    output = sh(project, "dvc", "exp", "run", "-n", "latent", *options)
    assert ran(output) == ["train_autoencoder", "train", "sample", "evaluate"]

    client, training, evaluations = mlflow_runs(project)
    (autoencoder_run,) = [r for r in training if r.info.run_name == "latent-autoencoder"]
    (latent_run,) = [r for r in training if r.info.run_name == "latent"]
    assert autoencoder_run.info.status == latent_run.info.status == "FINISHED"
    assert autoencoder_run.data.params["autoencoder.factor"] == "2"
    assert not [k for k in autoencoder_run.data.params if k.startswith(("model.", "train."))]
    ae_id = autoencoder_run.info.run_id
    assert [m.step for m in client.get_metric_history(ae_id, "loss")] == [5, 10, 15, 20]
    metrics = json.loads((project / "outputs/autoencoder/metrics.json").read_text())
    assert metrics["steps"] == 20 and math.isfinite(metrics["psnr"]) and metrics["latent_scale"] > 0
    assert autoencoder_run.data.metrics["psnr"] == pytest.approx(metrics["psnr"])
    assert autoencoder_run.data.metrics["latent_scale"] == pytest.approx(metrics["latent_scale"])
    for key in FLOOR:  # the latent model's floor, in its metrics, its run and its final line
        assert math.isfinite(metrics[key]), key
        assert autoencoder_run.data.metrics[key] == pytest.approx(metrics[key], rel=1e-12), key
    assert (f"classifier FD of the reconstructions {metrics['reconstruction_classifier_fd']:.4g} "
            f"(of the training images {metrics['floor_classifier_fd']:.4g})") in output
    images = [a.path for a in client.list_artifacts(ae_id, "images")]
    assert any(p.startswith("images/reconstructions+step+20+") for p in images), images
    assert latent_run.data.params["model.space"] == "latent"
    assert len(evaluations) == len(before) + 1  # the new model's evaluation, nested under it
    latest = max(evaluations, key=lambda r: r.info.start_time)
    assert latest.data.tags[PARENT_TAG] == latent_run.info.run_id

    saved = read_model_file(project / "outputs/train/ema.safetensors")
    assert saved.params.model.space == "latent" and saved.run_id == latent_run.info.run_id
    autoencoder_file = project / "outputs/autoencoder/model/autoencoder.safetensors"
    assert saved.autoencoder.sha256 == hashlib.sha256(autoencoder_file.read_bytes()).hexdigest()
    assert saved.autoencoder.run_id == ae_id and saved.autoencoder.step == 20
    assert saved.autoencoder.model.latent_shape == (4, 14, 14)
    pngs = sorted((project / "samples").glob("*.png"))
    assert len(pngs) == TINY["sample"]["num_images"]
    for png in pngs:
        with Image.open(png) as image:
            assert (image.size, image.mode) == ((28, 28), "L")
    evaluation = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    for key in ["classifier_fd", "classifier_kid", "class_coverage", "class_tv_distance"]:
        assert math.isfinite(evaluation[key]), key
    # The same images, count and settings: evaluate's floor is the one beside the reconstructions'.
    for key in ["floor_classifier_fd", "floor_classifier_kid"]:
        assert evaluation[key] == pytest.approx(metrics[key], rel=1e-12), key

    # The workspace holds the latent params now. A diffusion param's change on top of them: DVC
    # finds only the train stage's own deps changed, not the autoencoder's (a real run of it
    # cost this test another ~46 s on a shared 2-core Xeon).
    params_file = project / "params.yaml"
    latent_params = params_file.read_text()
    apply_overrides(params_file, ["diffusion.beta_end=0.03"])  # what `dvc exp run -S` does first
    try:
        status = sh(project, "dvc", "status")
    finally:
        params_file.write_text(latent_params)
    assert "diffusion" in status.split()  # DVC tracks the section as one param
    assert [s for s in STAGES if f"{s}:" in status.split()] == ["train"], status
