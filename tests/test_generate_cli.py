"""The trained model in use: logged and registered in MLflow, loaded as a pyfunc model, and the
command-line generator (`python -m pipeline.generate`) on registry URIs and local files.

One tiny class-conditional model is trained on random 8x8 images and logged three times into a
temporary SQLite store: once unregistered, then as versions 1 and 2 of one registered name.
"""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import generate as generate_cli
from pipeline.config import TrackingParams, from_dict
from pipeline.data import ImageSet, grid_image
from pipeline.config import sample_params
from pipeline.generate import main
from pipeline.inference import generate
from pipeline.model_file import EMA_FILE, load_ema_model
from pipeline.model_logging import log_ema_model
from pipeline.model_request import example_request, request_params
from pipeline.io import save_torch
from pipeline.logger import Logger
from pipeline.tracking import MlflowTracker, Run
from pipeline.training import train

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny-diffusion"
TINY = {"preprocess": {"image_size": 8, "channels": 1},
        "model": {"base_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [4],
                  "num_heads": 2, "norm_groups": 4, "num_classes": 2},
        "diffusion": {"num_timesteps": 50},
        "sample": {"num_steps": 4},
        "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "log_every": 2,
                  "checkpoint_every": 4, "sample_every": 4, "grid_images": 4,
                  "grid_sampling_steps": 3, "precision": "fp32", "cond_drop_prob": 0.2}}
# Sampling options of the CLI runs below, and the same as sample.* keys.
OPTIONS = ["--method", "ddim", "--steps", "3", "--eta", "0.5", "--guidance", "1.5",
           "--classes", "b"]
SAMPLE = {"method": "ddim", "num_steps": 3, "eta": 0.5, "guidance_scale": 1.5, "classes": ["b"]}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The tiny model's ema.safetensors, logged without a name, then registered twice."""
    root = tmp_path_factory.mktemp("project")
    images = torch.randint(0, 256, (16, 1, 8, 8), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared: more threads only wait for each other
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DVC_ROOT", str(root))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        params = from_dict(TINY)
        train(params, ImageSet(images, torch.arange(16) % 2, ("a", "b")), root / "train",
              Logger())
        tracker = MlflowTracker(TrackingParams(experiment="test"))
        client = MlflowClient(tracker.uri)
        runs, uris, versions = [], [], []
        for name in ["", NAME, NAME]:
            runs.append(tracker.training_run(params))
            runs[-1].log_metrics({"final_loss": 0.25}, step=4)  # the last step's
            uris.append(log_ema_model(runs[-1], root / "train" / EMA_FILE, name))
            versions.append(sorted(int(v.version) for v in
                                   client.search_model_versions(f"name = '{NAME}'")))
        environment_after = os.environ.get("MLFLOW_TRACKING_URI")
    torch.set_num_threads(threads)
    return SimpleNamespace(root=root, uri=tracker.uri, client=client, ema=root / "train" / EMA_FILE,
                           experiment_id=tracker.experiment_id, runs=runs, uris=uris,
                           versions=versions, environment_after=environment_after)


def environment(store, gpu=False):
    """The test's environment for a subprocess, with the store; the GPU hidden unless `gpu`, so
    that results can be compared with this process's CPU ones."""
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "PYTHONPATH")}
    env.update(MLFLOW_TRACKING_URI=store.uri, OMP_NUM_THREADS="1")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def cli(store, *args, gpu=False):
    return subprocess.run([sys.executable, "-m", "pipeline.generate", *map(str, args)],
                          cwd=store.root, env={**environment(store, gpu), "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)


def logged_model_id(store, uri):
    """The logged model that a models:/NAME/VERSION or models:/MODEL_ID URI names."""
    if uri.startswith(f"models:/{NAME}/"):
        uri = store.client.get_model_version(NAME, uri.rsplit("/", 1)[1]).source
    return uri.removeprefix("models:/")


def test_each_registration_is_a_new_version_of_the_runs_logged_model(store):
    assert store.versions == [[], [1], [1, 2]]
    assert store.uris[1:] == [f"models:/{NAME}/1", f"models:/{NAME}/2"]
    assert store.uris[0].startswith("models:/m-")  # the logged model's own URI
    for run, uri in zip(store.runs, store.uris):
        model_id = logged_model_id(store, uri)
        logged = store.client.get_logged_model(model_id)
        assert (logged.source_run_id, logged.experiment_id) == (run.id, store.experiment_id)
        assert logged.status == "READY"
        outputs = store.client.get_run(run.id).outputs.model_outputs
        assert [(o.model_id, o.step) for o in outputs] == [(model_id, 4)]  # the training step
        assert [(m.key, m.value, m.run_id) for m in logged.metrics] == \
            [("final_loss", 0.25, run.id)]
    assert store.environment_after is None  # logging leaves no MLFLOW_TRACKING_URI behind
    assert log_ema_model(Run(), store.ema, NAME) is None  # tracking off: nothing logged


def test_cli_draws_the_same_grid_from_the_registry_and_the_local_file(store, tmp_path):
    from_registry = cli(store, "--model", f"models:/{NAME}/latest", "--num", 6, "--seed", 1,
                        "--out", tmp_path / "registry.png", "--out-dir", tmp_path / "each",
                        *OPTIONS)
    assert from_registry.returncode == 0, from_registry.stderr
    assert "generate: 6 images with ddim, 3 steps, seed 1, on cpu" in from_registry.stdout
    local = cli(store, "--model", store.ema, "--num", 6, "--seed", 1, "--out",
                tmp_path / "local.png", *OPTIONS)
    reseeded = cli(store, "--model", store.ema, "--num", 6, "--seed", 2, "--out",
                   tmp_path / "reseeded.png", *OPTIONS)
    assert local.returncode == reseeded.returncode == 0, local.stderr + reseeded.stderr

    grid = tmp_path / "registry.png"
    assert grid.read_bytes() == (tmp_path / "local.png").read_bytes()
    assert grid.read_bytes() != (tmp_path / "reseeded.png").read_bytes()
    # 6 images of 8 px: 3 columns, 2 rows, each tile framed by 2 px
    pixels = np.asarray(Image.open(grid))
    assert pixels.shape == (2 * 10 + 2, 3 * 10 + 2)
    # each tile is what the library draws with the same options, and is also its own PNG
    trained = load_ema_model(store.ema, torch.device("cpu"))
    expected, _ = generate(trained, sample_params({**SAMPLE, "seed": 1}), num_images=6)
    for i, image in enumerate(expected[:, 0].numpy()):
        row, column = divmod(i, 3)
        tile = pixels[2 + 10 * row:10 + 10 * row, 2 + 10 * column:10 + 10 * column]
        assert np.array_equal(tile, image)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "each" / f"{i:05d}.png")), image)
    assert len(list((tmp_path / "each").glob("*.png"))) == 6
    # the same model by its run, and by its logged model's own URI (logged unregistered)
    for model in [f"runs:/{store.runs[2].id}/model", store.uris[0]]:
        main(["--model", model, "--num", "6", "--seed", "1", "--out", str(tmp_path / "other.png"),
              "--tracking-uri", store.uri, "--device", "cpu", *OPTIONS])
        assert (tmp_path / "other.png").read_bytes() == grid.read_bytes()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, message", [
    (["--model", "models:/no-such-model/latest"],
     "--model models:/no-such-model/latest: Registered Model with name=no-such-model not found"),
    (["--model", f"models:/{NAME}/7"], f"--model models:/{NAME}/7: "),
    (["--model", "runs:/0123456789abcdef/model"], "--model runs:/0123456789abcdef/model: Run"),
    (["--model", "nowhere/ema.safetensors"], "--model nowhere/ema.safetensors: no such file"),
    (["--model", f"models:/{NAME}/1", "--tracking-uri", "http://127.0.0.1:PORT"],
     "MLflow tracking store http://127.0.0.1:PORT is unreachable"),
    (["--model", f"models:/{NAME}/1", "--tracking-uri", "sqlite:///TMP/missing.db"],
     "MLflow tracking store sqlite:///TMP/missing.db does not exist"),
    (["--model", "TMP/tensors.pt"],
     "--model TMP/tensors.pt: not an EMA model file (the ema.safetensors of the train stage): it has "
     "no 'params'"),
    (["--model", "EMA", "--method", "euler"],
     "--method = 'euler' is not allowed; choose one of 'ddpm', 'ddim', 'dpmpp_2m'"),
    (["--model", "EMA", "--steps", "0"], "--steps = 0 is out of range; allowed: >= 1"),
    (["--model", "EMA", "--steps", "51"], "--steps 51: more than the model's 50 timesteps"),
    (["--model", "EMA", "--classes", "b,z", "--steps", "3"],
     "--classes: unknown class 'z'; the model's classes are 'a', 'b'"),
    (["--model", "EMA", "--num", "0"], "--num 0: must be at least 1"),
])
def test_cli_errors_are_one_line_naming_the_value(store, tmp_path, capsys, args, message):
    port = str(closed_port())
    args = [a.replace("EMA", str(store.ema)).replace("PORT", port).replace("TMP", str(tmp_path))
            for a in args]
    message = message.replace("PORT", port).replace("TMP", str(tmp_path))
    num = [] if "--num" in args else ["--num", "2"]
    save_torch({"images": torch.zeros(2, 1, 8, 8, dtype=torch.uint8)}, tmp_path / "tensors.pt")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", store.uri)
        with pytest.raises(SystemExit) as exit:
            main([*args, *num, "--out", str(tmp_path / "grid.png")])
    error = str(exit.value.code)
    assert error.startswith(f"generate: error: {message}") and "\n" not in error
    assert not (tmp_path / "grid.png").exists() and not (tmp_path / "missing.db").exists()


def test_bad_option_syntax_is_one_line(store, tmp_path):
    result = cli(store, "--model", store.ema, "--num", "many", "--out", tmp_path / "grid.png")
    assert result.returncode == 2
    assert result.stderr == "generate: error: argument --num: invalid int value: 'many' " \
                            "(see --help)\n"


class RunsCode:
    """Pickles into a call of os.system: what a crafted weights file would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_in_place_of_the_registered_weights_is_refused(store, tmp_path):
    model_id = logged_model_id(store, f"models:/{NAME}/1")
    location = store.client.get_logged_model(model_id).artifact_location
    weights = Path(location.removeprefix("file://")) / "artifacts" / EMA_FILE
    original = weights.read_bytes()
    marker = tmp_path / "pwned"
    torch.save({"weights": RunsCode(marker), "params": {}, "classes": [], "run_id": None,
                "step": 0}, weights)
    try:
        result = cli(store, "--model", f"models:/{NAME}/1", "--num", 2, "--out",
                     tmp_path / "grid.png")
    finally:
        weights.write_bytes(original)
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"generate: error: --model models:/{NAME}/1: ")
    assert re.search(r"ema\.safetensors: refused to load: it holds pickled Python objects, not only "
                     r"tensors, and loading it could run arbitrary code \(.*posix\.system", error)
    assert not marker.exists() and not (tmp_path / "grid.png").exists()
    crafted = tmp_path / "crafted.pt"
    torch.save({"weights": RunsCode(marker)}, crafted)
    torch.load(crafted, weights_only=False)  # the payload is real: loading it unsafely runs it
    assert marker.exists()


def test_the_pyfunc_model_loads_anywhere_and_predicts_the_input_example(store, tmp_path):
    """Loaded by MLflow in a fresh interpreter outside the repository: the model brings its code."""
    script = f"""
import json, mlflow, numpy, pandas
model = mlflow.pyfunc.load_model("models:/{NAME}/2")
example = model.input_example
numpy.save("example.npy", model.predict(example))
two = pandas.DataFrame([{{**example.iloc[0].to_dict(), "num_images": 2, "seed": 5}},
                        {{**example.iloc[0].to_dict(), "num_images": 3, "classes": "a"}}])
numpy.save("two.npy", model.predict(two))
json.dump(example.to_dict("records"), open("example.json", "w"))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment(store),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    example = json.loads((tmp_path / "example.json").read_text())
    trained = load_ema_model(store.ema, torch.device("cpu"))
    assert example == [example_request(trained)]

    def expected(request):
        images, _ = generate(trained, *request_params(request))
        return images.permute(0, 2, 3, 1).numpy()

    predicted = np.load(tmp_path / "example.npy")
    assert predicted.dtype == np.uint8 and predicted.shape == (4, 8, 8, 1)
    assert np.array_equal(predicted, expected(example[0]))
    two = np.load(tmp_path / "two.npy")
    assert two.shape == (5, 8, 8, 1)
    assert np.array_equal(two[:2], expected({**example[0], "num_images": 2, "seed": 5}))
    assert np.array_equal(two[2:], expected({**example[0], "num_images": 3, "classes": "a"}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cli_samples_on_the_gpu(store, tmp_path):
    result = cli(store, "--model", f"models:/{NAME}/latest", "--num", 6, "--out",
                 tmp_path / "grid.png", "--device", "cuda", *OPTIONS, gpu=True)
    assert result.returncode == 0, result.stderr
    assert "on cuda" in result.stdout
    assert Image.open(tmp_path / "grid.png").size == (3 * 10 + 2, 2 * 10 + 2)


def readme_generate_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return [line.removeprefix("uv run ") for line in readme.splitlines()
            if line.startswith("uv run python -m pipeline.generate ")]


def test_the_readmes_generate_examples_run_as_written(store, tmp_path):
    commands = readme_generate_commands()
    assert len(commands) == 2
    (store.root / "outputs/train").mkdir(parents=True, exist_ok=True)
    shutil.copy(store.ema, store.root / "outputs/train" / EMA_FILE)
    for command in commands:
        # Only the registry name differs: the test store registers its model as NAME.
        args = shlex.split(command.replace("models:/simple-diffusion/", f"models:/{NAME}/"))[3:]
        (store.root / "grid.png").unlink(missing_ok=True)
        result = cli(store, *args)
        assert result.returncode == 0, result.stderr
        assert "generate: 64 images" in result.stdout  # --num 64, written or the default
        assert Image.open(store.root / "grid.png").size == grid_image(torch.zeros(64, 1, 8, 8)).size


@pytest.mark.parametrize(("out", "message"), [
    ("TMP", "--out TMP is a folder; name an image file in it, e.g. TMP/grid.png"),
    ("TMP/grid.tmp", "--out TMP/grid.tmp: not an image file name; end it in .png or .jpg"),
    ("TMP/grid", "--out TMP/grid: not an image file name; end it in .png or .jpg"),
    ("TMP/file.txt/grid.png", "--out TMP/file.txt/grid.png: cannot write there (TMP/file.txt is "
                              "not a writable folder)"),
])
def test_a_bad_out_path_is_named_before_any_sampling(store, tmp_path, monkeypatch, out, message):
    (tmp_path / "file.txt").write_text("")
    monkeypatch.setattr(generate_cli, "load_model", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as exit:
        main(["--model", str(store.ema), "--out", out.replace("TMP", str(tmp_path))])
    assert str(exit.value.code) == f"generate: error: {message.replace('TMP', str(tmp_path))}"


def test_an_unwritable_out_folder_is_named_before_any_sampling(store, tmp_path, monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    monkeypatch.setattr(generate_cli, "load_model", lambda *a: pytest.fail("loaded the model"))
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != folder)  # root may write
    with pytest.raises(SystemExit) as exit:
        main(["--model", str(store.ema), "--out", str(folder / "grid.png")])
    assert str(exit.value.code) == (f"generate: error: --out {folder / 'grid.png'}: cannot write "
                                    f"there ({folder} is not a writable folder)")


def test_the_export_reads_a_registered_model_as_the_generator_does(store, tmp_path):
    """pipeline.export resolves --model with the generator's open_model: the registered model's
    export holds the same weights as the local file's."""
    from safetensors.torch import load_file

    from pipeline import export
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", store.uri)
        export.main(["--model", f"models:/{NAME}/2", "--out", str(tmp_path / "registry")])
    export.main(["--model", str(store.ema), "--out", str(tmp_path / "local")])
    registry, local = (load_file(tmp_path / folder / "unet/diffusion_pytorch_model.safetensors")
                       for folder in ("registry", "local"))
    assert registry.keys() == local.keys() and all(torch.equal(registry[k], local[k]) for k in local)
    assert f"- exported from: `models:/{NAME}/2`" in (tmp_path / "registry/README.md").read_text()
