"""Whole-pipeline figures: each stage's fixed start-up cost, and the time of a no-op `dvc repro`.

Start-up: a fresh interpreter that imports the stage's module (stages/<name>.py, not run) and, for
the stages that build the UNet (train, sample), builds it from params.yaml; the wall time of the
whole process, interpreter start included, is what every `dvc repro` of that stage pays before
any work.

No-op `dvc repro`: measured in the project root when `dvc status` says everything is up to date
(after a repro); otherwise in a temporary project with the same dvc.yaml, params.yaml and code
dependencies, data/images.zip holding as many (tiny) members as MNIST has images, 70,004 (the
data is one archive file, as data.dvc pins it), and stub commands that write every output,
reproduced once and then timed. DVC's work in a no-op repro is checking these dependencies and
outputs, so the stubs do not change it.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import yaml

STAGES = ("preprocess", "train_classifier", "train", "sample", "evaluate")
BUILDS_MODEL = ("train", "sample")
MNIST_IMAGES = 70_004


def startup_seconds(stage: str, root: Path) -> float:
    """Wall time of `python -c "import stages.<stage>"` (+ building the UNet where it does)."""
    code = f"import stages.{stage}"
    if stage in BUILDS_MODEL:
        code += ("\nfrom pipeline.config import load_params\nfrom pipeline.unet import build_model"
                 "\nbuild_model(load_params())")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
    return time.perf_counter() - start


def dvc() -> str:
    """The dvc of this interpreter's environment."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def is_up_to_date(root: Path) -> bool:
    if not (root / "dvc.lock").exists() or not (root / "outputs").exists():
        return False
    status = subprocess.run([dvc(), "status", "--quiet"], cwd=root, capture_output=True)
    return status.returncode == 0


def outputs(stage: dict) -> list[str]:
    """The paths a dvc.yaml stage writes: outs, metrics and plots, entries given as str or dict."""
    paths = []
    for kind in ("outs", "metrics", "plots"):
        for entry in stage.get(kind, []):
            paths.extend([entry] if isinstance(entry, str) else list(entry))
    return paths


def stub_command(paths: list[str]) -> str:
    """A command that writes each path: a file where the name has a suffix, else a folder."""
    return f"{sys.executable} -c \"import sys; from bench.pipeline_times import touch; " \
           f"touch(sys.argv[1:])\" " + " ".join(paths)


def touch(paths: list[str]) -> None:
    for name in paths:
        path = Path(name)
        if not path.suffix:
            path = path / "0.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}\n" if path.suffix == ".json" else "x\n")


def make_temp_project(root: Path, folder: Path, members: int) -> None:
    """dvc.yaml with stub commands, params.yaml, the code deps and data/ under folder."""
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    for stage in pipeline["stages"].values():
        stage["cmd"] = stub_command(outputs(stage))
    (folder / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    shutil.copy(root / "params.yaml", folder)
    for package in ("pipeline", "stages", "bench"):
        shutil.copytree(root / package, folder / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "data").mkdir()
    with zipfile.ZipFile(folder / "data" / "images.zip", "w") as archive:
        for i in range(members):
            archive.writestr(f"train/{i % 10}/{i}.png", i.to_bytes(4, "little"))
    subprocess.run([dvc(), "init", "--no-scm", "--quiet"], cwd=folder, check=True)
    subprocess.run([dvc(), "repro", "--quiet"], cwd=folder, check=True, capture_output=True)


def noop_repro_seconds(folder: Path) -> float:
    start = time.perf_counter()
    subprocess.run([dvc(), "repro", "--quiet"], cwd=folder, check=True, capture_output=True)
    return time.perf_counter() - start


def pipeline_figures(root: Path, repeats: int, members: int | None = None) -> dict:
    """{"stage_startup_s": {stage: median s}, "noop_repro_s": median s, "noop_repro_where": ...}."""
    members = members or MNIST_IMAGES
    startup = {stage: statistics.median(startup_seconds(stage, root) for _ in range(repeats))
               for stage in STAGES}
    if is_up_to_date(root):
        where = f"{root} (up to date after a repro)"
        noop = statistics.median(noop_repro_seconds(root) for _ in range(repeats))
    else:
        where = (f"temporary project: this dvc.yaml with stub commands, data/images.zip of "
                 f"{members} members ({root} has not been reproduced)")
        with tempfile.TemporaryDirectory() as tmp:
            make_temp_project(root, Path(tmp), members)
            noop = statistics.median(noop_repro_seconds(Path(tmp)) for _ in range(repeats))
    return {"stage_startup_s": startup, "noop_repro_s": noop, "noop_repro_where": where}
