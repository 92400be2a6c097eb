"""The MLflow UI in a real browser: after a tiny pipeline run, what a user looks at is there.

The stages run as scripts (`python -m stages.<name>`, as dvc.yaml runs them) in a temporary
folder with tiny params and tiny random data (two classes of bars, no MNIST), so their MLflow
store is that folder's mlflow.db. Then `mlflow ui` serves that store on 127.0.0.1 and Debian's
Chromium, driven by Playwright (no `playwright install`: no browser download), opens the
experiment and the run and checks the params, the metrics, the loss chart and the sample image.
A screenshot of the run page goes to the test's temporary folder, or to SCREENSHOT_ENV's path
(docs/mlflow-ui.png in the README was made so).

Chromium is Debian's package (`apt-get install chromium`, .ci/run installs it). Without it the
test is skipped with that instruction, except in CI (CI=true), where a missing browser fails.
"""

import json
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from playwright.sync_api import expect, sync_playwright

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT_ENV = "MLFLOW_UI_SCREENSHOT"
STAGES = ["preprocess", "train_classifier", "train", "sample", "evaluate"]
TINY = {
    "preprocess": {"data_dir": "data", "image_size": 16, "max_reference_images": 40},
    "model": {"base_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [8],
              "num_heads": 2, "norm_groups": 4, "num_classes": 0},  # its data: two classes
    "train": {"steps": 30, "batch_size": 8, "warmup_steps": 2, "log_every": 3,
              "checkpoint_every": 15, "sample_every": 15, "grid_images": 4,
              "grid_sampling_steps": 2},
    "sample": {"num_images": 16, "batch_size": 8, "num_steps": 3},
    "classifier": {"epochs": 1, "batch_size": 16},
    "evaluate": {"inception": False, "kid_subset_size": 8, "batch_size": 16},
}


def chromium() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("CI") == "true":
        pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run installs it with "
                    "`apt-get install -y chromium`; did that step run?")
    pytest.skip(f"{CHROMIUM} is missing: `apt-get install -y chromium` (Debian's package) "
                "to run the browser test; CI installs it")


def write_bars(folder: Path, count: int, seed: int) -> None:
    """`count` 16x16 grey PNGs per class: a bright horizontal or vertical bar on dark noise."""
    rng = np.random.default_rng(seed)
    for name in ("horizontal", "vertical"):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            image = rng.integers(0, 40, (16, 16), dtype=np.uint8)
            row = rng.integers(3, 13)
            if name == "horizontal":
                image[row, :] = 255
            else:
                image[:, row] = 255
            Image.fromarray(image).save(folder / name / f"{i}.png")


def environment(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(ROOT)  # the stages of this checkout, run in the project folder
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TORCH_HOME"] = str(project / "torch-home")
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"  # no usage reports from the server or the UI
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("browser")
    write_bars(project / "data" / "train", 48, seed=0)
    write_bars(project / "data" / "test", 20, seed=1)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in STAGES:
        done = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=project,
                              env=environment(project), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"stage {stage} failed:\n{done.stdout}\n{done.stderr}"
    return project


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_ui_command() -> list[str]:
    """The `mlflow ui` command of README.md's MLflow section, without its `uv run` prefix (the
    tests already run in the project's environment) and with MLflow's script of this one."""
    section = (ROOT / "README.md").read_text().split("\n## MLflow\n")[1].split("\n## ")[0]
    line = next(line for line in section.splitlines() if "mlflow ui" in line)
    words = shlex.split(line.split("#")[0])
    assert words[:3] == ["uv", "run", "mlflow"], line
    return [str(Path(sys.executable).parent / "mlflow"), *words[3:]]


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on `port`, from the kernel's tables."""
    addresses = set()
    for table, unpack in [("/proc/net/tcp", "<I"), ("/proc/net/tcp6", "<IIII")]:
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: TCP_LISTEN
                packed = struct.pack(unpack, *struct.unpack(f">{unpack[1:]}",
                                                             bytes.fromhex(address)))
                family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
                addresses.add(socket.inet_ntop(family, packed))
    return addresses


@pytest.fixture(scope="module")
def mlflow_ui(project):
    """The README's `mlflow ui` command in the project folder (so its sqlite:///mlflow.db is the
    project's store), on a free port; yields its URL once /health answers."""
    port = free_port()
    log = (project / "mlflow-ui.log").open("w")
    server = subprocess.Popen([*readme_ui_command(), "--port", str(port)], cwd=project,
                              env=environment(project), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            os.killpg(server.pid, signal.SIGKILL)
            pytest.fail(f"mlflow ui did not start:\n{(project / 'mlflow-ui.log').read_text()}")
        time.sleep(0.5)
    yield url
    os.killpg(server.pid, signal.SIGTERM)  # the UI and the workers it started
    server.wait(timeout=60)
    log.close()


def test_the_documented_ui_listens_on_loopback_only(mlflow_ui):
    assert "--host 127.0.0.1" in " ".join(readme_ui_command())  # said, not MLflow's default
    assert listening_addresses(int(mlflow_ui.rsplit(":", 1)[1])) == {"127.0.0.1"}


@pytest.fixture(scope="module")
def training_run(project):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("simple-diffusion")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string="tags.`mlflow.parentRunId` IS NULL")
    assert len(runs) == 1
    return experiment.experiment_id, runs[0]


@pytest.fixture(scope="module")
def browser():
    executable = chromium()
    expect.set_options(timeout=30_000)  # the UI loads slowly on a busy 2-core machine

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    # Keep MLflow's assistant panel shut: it would cover part of every page and screenshot.
    context.add_init_script("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1',"
                            " 'true')")
    page = context.new_page()
    yield page
    context.close()


def row(page, name: str):
    """The table row (params or metrics of a run page) whose first cell is `name`."""
    return page.get_by_role("row").filter(has=page.get_by_text(name, exact=True))


def value(page, name: str):
    """The value cell of that row (metrics of a run with a logged model have a third column)."""
    return row(page, name).get_by_role("cell").nth(1)


def test_experiment_page_lists_the_run(page, mlflow_ui, training_run):
    experiment_id, run = training_run
    page.goto(f"{mlflow_ui}/#/experiments/{experiment_id}/runs")
    link = page.get_by_role("link", name=run.info.run_name, exact=True)
    expect(link).to_be_visible()
    assert link.get_attribute("href").endswith(f"/runs/{run.info.run_id}")
    link.click()
    expect(page.get_by_role("heading", name=run.info.run_name)).to_be_visible()


def test_run_page_shows_params_and_metrics(page, mlflow_ui, project, training_run):
    experiment_id, run = training_run
    page.goto(f"{mlflow_ui}/#/experiments/{experiment_id}/runs/{run.info.run_id}")
    expect(value(page, "train.steps")).to_have_text(str(TINY["train"]["steps"]))
    expect(value(page, "model.base_channels")).to_have_text(str(TINY["model"]["base_channels"]))
    evaluation = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    for name in ("classifier_fd", "class_coverage", "num_samples"):
        cell = value(page, name)
        expect(cell).to_be_visible()
        assert float(cell.inner_text()) == pytest.approx(evaluation[name]), name


def test_model_metrics_tab_opens_on_the_loss_curve_and_the_fd(page, mlflow_ui, project,
                                                              training_run):
    experiment_id, run = training_run
    page.goto(f"{mlflow_ui}/#/experiments/{experiment_id}/runs/{run.info.run_id}/model-metrics")
    cards = page.get_by_test_id("experiment-view-compare-runs-card")
    loss = cards.filter(has=page.get_by_text("loss", exact=True))
    fd = cards.filter(has=page.get_by_text("classifier_fd", exact=True))
    expect(loss).to_have_count(1)
    expect(fd).to_have_count(1)
    # One vertex per logged step (steps / log_every of them): "M x,y" then "L x,y" for each other.
    logged = TINY["train"]["steps"] // TINY["train"]["log_every"]
    vertex = r"[-\d.]+,[-\d.]+"
    expect(loss.locator("path.js-line").first).to_have_attribute(
        "d", re.compile(rf"^M{vertex}(L{vertex}){{{logged - 1}}}$"))
    # In view as the page opens, unscrolled: the loss chart whole, in the first row (the "train"
    # section), and the FD chart's title and most of its plot in the row below.
    height = page.viewport_size["height"]
    first, box = cards.first.bounding_box(), loss.bounding_box()
    assert box["y"] == pytest.approx(first["y"], abs=2) and box["y"] + box["height"] <= height
    assert fd.bounding_box()["y"] + 0.6 * fd.bounding_box()["height"] <= height
    assert page.evaluate("window.scrollY") == 0
    page.wait_for_timeout(500)  # let the chart's transition settle before the screenshot
    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or project / "mlflow-ui.png")
    page.screenshot(path=screenshot)
    with Image.open(screenshot) as image:
        assert image.format == "PNG" and image.size == (1400, 900)


def test_artifacts_tab_shows_the_sample_grid(page, mlflow_ui, project, training_run):
    experiment_id, run = training_run
    page.goto(f"{mlflow_ui}/#/experiments/{experiment_id}/runs/{run.info.run_id}/artifacts")
    page.get_by_text("samples", exact=True).click()
    for name in ("grid.png", "progression.png", "class_grid.png"):
        expect(page.get_by_text(name, exact=True)).to_be_visible()
    page.get_by_text("grid.png", exact=True).click()
    preview = page.locator("img[src^='blob:']").first
    with Image.open(project / "outputs/sample/grid.png") as grid:
        width, height = grid.size
    # The real image was fetched from the store and decoded: it has the file's size.
    expect(preview).to_have_js_property("naturalWidth", width)
    expect(preview).to_have_js_property("naturalHeight", height)
