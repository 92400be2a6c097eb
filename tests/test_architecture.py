"""The layout: each stage's deps in dvc.yaml are exactly the project code it runs, the imports
have no circles, each choice is defined once, and the stage paths agree with dvc.yaml.

Imports are read from the source by pipeline/code_digest.py, all of them (module-level,
function-level and under TYPE_CHECKING), since each is code that a stage may run and an edge of
the graph.
"""

import ast
import re
import typing
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import autoencoder, config, noise_scheduler, sampler
from pipeline.code_digest import (PACKAGES, READS, ROOT, closure, imported_modules, imports,
                                  module_file)
from pipeline.noise_scheduler import NoiseScheduler
from stages import paths


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_module_file(stage: dict) -> str:
    command = stage["cmd"].split()
    assert command[:3] == ["python", "-m", command[2]], f"not a `python -m` stage: {stage['cmd']}"
    return module_file(command[2])


@pytest.mark.parametrize("name", list(dvc_stages()))
def test_each_stage_lists_exactly_the_project_code_it_imports(name):
    stage = dvc_stages()[name]
    code = closure(stage_module_file(stage))
    listed = {dep for dep in stage["deps"] if dep.endswith(".py")}
    assert not code - listed, f"{name}: dvc.yaml misses {sorted(code - listed)}"
    assert not listed - code, f"{name}: dvc.yaml lists {sorted(listed - code)}, not imported"


def test_the_closure_test_fails_when_a_dep_goes_missing():
    stage = dvc_stages()["train"]
    code = closure(stage_module_file(stage))
    # What the test above compares: the data module reached only through other modules.
    assert {"pipeline/data.py", "pipeline/config.py", "stages/__init__.py"} <= code
    listed = {dep for dep in stage["deps"] if dep.endswith(".py")} - {"pipeline/data.py"}
    assert code - listed == {"pipeline/data.py"}


def test_a_sampler_or_metrics_change_does_not_retrain_nor_resample():
    train, sample = (closure(stage_module_file(dvc_stages()[s])) for s in ("train", "sample"))
    assert "pipeline/metrics.py" not in train | sample
    assert "pipeline/tracking.py" not in sample  # sampling needs no MLflow
    assert "pipeline/training.py" not in sample  # nor the training loop


def test_a_unet_or_sampler_change_does_not_retrain_the_autoencoder():
    code = closure(stage_module_file(dvc_stages()["train_autoencoder"]))
    assert not code & {"pipeline/unet.py", "pipeline/sampler.py", "pipeline/model_file.py",
                       "pipeline/noise_scheduler.py", "pipeline/training.py"}


def test_no_diffusion_param_retrains_the_autoencoder_nor_an_autoencoder_param_the_unet():
    """train reads the autoencoder through its folder (its file and latents; in pixel space a
    marker that no autoencoder param changes), never through params of its own. Of the
    diffusion's sections the autoencoder's stage reads model.space and sample.num_images, the
    count of its reconstruction floor, which is no part of its run's identity (tests/
    test_autoencoder.py): a change re-scores, it does not retrain."""
    stages = dvc_stages()
    assert [p for p in stages["train_autoencoder"]["params"]
            if p.split(".")[0] in ("model", "diffusion", "train", "sample")
            ] == ["model.space", "sample.num_images"]
    assert "outputs/autoencoder/model" in stages["train"]["deps"]
    assert not [p for p in stages["train"]["params"] if p.startswith("autoencoder")]


def import_graph() -> dict[str, set[str]]:
    files = [p.relative_to(ROOT).as_posix() for package in PACKAGES
             for p in (ROOT / package).glob("*.py")]
    return {file: imports(file) - set(READS.get(file, [])) for file in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports as [a, b, ..., a], None if there is none (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, then "done"
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = "done"
        return None

    return next((c for node in sorted(graph) if node not in state and (c := visit(node))), None)


def test_the_imports_have_no_circle():
    assert find_cycle(import_graph()) is None


def test_the_circle_finder_finds_a_circle_through_a_function_level_import(tmp_path):
    source = "def later():\n    from pipeline.b import x\n"
    assert "pipeline.b" in imported_modules(ast.parse(source))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_library_never_imports_a_stage():
    assert not [(f, i) for f, deps in import_graph().items() if f.startswith("pipeline/")
                for i in deps if i.startswith("stages/")]


def literal_fields() -> list[tuple[str, str, tuple]]:
    sections = typing.get_type_hints(config.Params)
    return [(section, name, config.choices(hint))
            for section, cls in sections.items()
            for name, hint in typing.get_type_hints(cls).items()
            if typing.get_origin(hint) is typing.Literal and isinstance(config.choices(hint)[0], str)]


# How the library takes each choice of the config, by (section, key).
ACCEPTS = {
    ("diffusion", "schedule"): lambda v: NoiseScheduler(10, schedule=v),
    ("diffusion", "prediction_type"): lambda v: NoiseScheduler(10, prediction_type=v),
    ("sample", "method"): lambda v: sampler.sample(lambda x, t: x, NoiseScheduler(10),
                                                   (1, 1, 2, 2), method=v, num_steps=2),
    ("sample", "timestep_spacing"): lambda v: sampler.timesteps(10, 2, v),
    ("sample", "variance_type"): lambda v: noise_scheduler.posterior_coefficients(0.5, 0.9, v),
    ("autoencoder", "reconstruction_loss"): lambda v: autoencoder.autoencoder_loss(
        torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2),
        autoencoder.DiagonalGaussian(torch.zeros(1, 2, 1, 1)), 0.0, v),
}
# Choices that only the config checks, read by the code as flags: train.precision and
# sample.precision (pipeline.device.fixed_precision), preprocess.on_bad_image (pipeline.data.BadImages),
# diffusion.formulation (pipeline.noise_scheduler.build_scheduler), model.space (stages
# train_autoencoder and train).
FLAGS = {("train", "precision"), ("sample", "precision"), ("preprocess", "on_bad_image"),
         ("diffusion", "formulation"), ("model", "space")}


def test_every_choice_of_the_config_is_taken_by_the_library_or_a_flag():
    assert {(section, key) for section, key, _ in literal_fields()} == set(ACCEPTS) | FLAGS


@pytest.mark.parametrize(("section", "key", "allowed"),
                         [f for f in literal_fields() if f[:2] in ACCEPTS])
def test_the_library_accepts_exactly_the_configs_choices(section, key, allowed):
    for value in allowed:
        ACCEPTS[section, key](value)
    with pytest.raises(ValueError, match=rf"{key} must be one of {re.escape(repr(allowed[0]))}"):
        ACCEPTS[section, key]("no-such-choice")


def test_every_library_choice_list_comes_from_the_config():
    assert sampler.METHODS == config.choices(config.SamplingMethod)
    assert sampler.SPACINGS == config.choices(config.TimestepSpacing)
    assert noise_scheduler.SCHEDULES == config.choices(config.Schedule)


def declared_paths(stage: dict) -> set[str]:
    entries = stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", [])
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def test_the_stage_paths_are_the_outs_of_dvc_yaml():
    named = {str(value) for key, value in vars(paths).items() if key.isupper()}
    outs = set().union(*(declared_paths(stage) for stage in dvc_stages().values()))
    # The train stage's folder, the files in the autoencoder's folder (an out), and the
    # checkpoints, which are kept out of DVC's hands.
    inside = {str(p) for p in (paths.AUTOENCODER, paths.LATENTS, paths.RECONSTRUCTIONS,
                               paths.NO_AUTOENCODER)}
    kept_out = {str(paths.TRAIN_DIR), str(paths.CHECKPOINTS), str(paths.AUTOENCODER_CHECKPOINTS)}
    assert named - kept_out - inside == outs
    assert paths.EMA_MODEL.parent == paths.TRAIN_DIR and paths.CHECKPOINTS.is_absolute()
    assert {p.parent for p in map(Path, inside)} == {paths.AUTOENCODER_DIR}
    assert paths.AUTOENCODER.name == autoencoder.AUTOENCODER_FILE
    assert paths.LATENTS.name == autoencoder.LATENTS
