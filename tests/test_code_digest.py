"""The digest of the code a run depends on: which files it covers, and when it changes."""

from pathlib import Path

from pipeline import autoencoder_training, training
from pipeline.code_digest import closure, digest

FILES = {
    "pipeline/__init__.py": "",
    "pipeline/loop.py": "from pipeline.model import Net\nfrom pipeline import report\n",
    "pipeline/model.py": "import torch\n\ndef later():\n    import pipeline.layers\n",
    "pipeline/layers.py": "",
    "pipeline/report.py": "from pipeline import scores, layers\n",
    "pipeline/scores.py": "",  # imported by report.py only
    "stages/run.py": "from pipeline.loop import step\n",
}


def project(tmp_path: Path) -> Path:
    for name, source in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    return tmp_path


def test_the_closure_follows_every_project_import_and_leaves_out_what_only_a_skip_imports(
        tmp_path):
    root = project(tmp_path)
    assert closure("pipeline/loop.py", root=root) == {
        "pipeline/__init__.py", "pipeline/loop.py", "pipeline/model.py", "pipeline/layers.py",
        "pipeline/report.py", "pipeline/scores.py"}  # torch is not ours; `later` counts
    # layers.py stays: model.py imports it too. scores.py goes: only report.py imports it.
    assert closure("pipeline/loop.py", skip=["pipeline/report.py"], root=root) == {
        "pipeline/__init__.py", "pipeline/loop.py", "pipeline/model.py", "pipeline/layers.py"}


def test_the_digest_changes_with_a_file_it_covers_and_only_then(tmp_path):
    root = project(tmp_path)

    def loop_digest() -> str:
        return digest(closure("pipeline/loop.py", skip=["pipeline/report.py"], root=root), root)

    before = loop_digest()
    assert digest(sorted(closure("pipeline/loop.py", skip=["pipeline/report.py"], root=root),
                         reverse=True), root) == before  # the order given does not matter
    (root / "pipeline/scores.py").write_text("x = 1\n")  # skipped: no change
    (root / "stages/run.py").write_text("")  # not imported
    assert loop_digest() == before
    (root / "pipeline/layers.py").write_text("# a comment is a change too\n")
    assert loop_digest() != before


def test_the_digest_tells_a_moved_content_from_the_same_content(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("")
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "a.py").write_text("")
    (swapped / "b.py").write_text("x = 1\n")
    assert digest(["a.py", "b.py"], tmp_path) != digest(["a.py", "b.py"], swapped)


def test_the_training_digests_cover_the_code_that_makes_the_weights_not_the_reporting():
    unet = closure("pipeline/training.py")
    assert {"pipeline/unet.py", "pipeline/ema.py", "pipeline/noise_scheduler.py",
            "pipeline/edm.py", "pipeline/sampler.py", "pipeline/batches.py"} <= unet
    assert not unet & {"pipeline/tracking.py", "pipeline/metrics.py", "pipeline/plots.py",
                       "pipeline/model_logging.py"}
    latent = closure("pipeline/autoencoder_training.py", skip=["pipeline/metrics.py"])
    assert {"pipeline/autoencoder.py", "pipeline/batches.py"} <= latent
    assert not latent & {"pipeline/metrics.py", "pipeline/classifier.py", "pipeline/unet.py"}
    assert training.training_code() == digest(unet)
    assert training.training_code("stages/train.py") == digest(unet | {"stages/train.py"})
    assert autoencoder_training.training_code("stages/train_autoencoder.py") == \
        digest(latent | {"stages/train_autoencoder.py"})
