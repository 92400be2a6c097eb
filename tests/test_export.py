"""The export to diffusers (pipeline/export.py, pipeline/diffusers_map.py): the same network, the
same schedule and, with the same noise, the same samples as the project's own sampler."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from pipeline import export
from pipeline.config import Params, TrackingParams, from_dict, load_params, to_dict
from pipeline.diffusers_map import scheduler_config, unet_config, unet_state_dict
from pipeline.model_file import EMA_FILE, save_ema_model
from pipeline.noise_scheduler import build_scheduler
from pipeline.sampler import model_fn, sample
from pipeline.tracking import MlflowTracker
from pipeline.unet import UNet, build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = {"preprocess": {"image_size": 8, "channels": 1},
        "model": {"base_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [4],
                  "num_heads": 2, "norm_groups": 4, "dropout": 0.0, "num_classes": 0},
        "diffusion": {"num_timesteps": 20}}



@pytest.fixture(autouse=True)
def one_thread():
    """The CPU is shared: with more threads, the tiny models' steps only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**sections: dict) -> Params:
    return from_dict({name: {**TINY.get(name, {}), **sections.get(name, {})}
                      for name in {*TINY, *sections}}, check_combinations=False)


def random_model(params: Params) -> UNet:
    """A model with every weight random: the zero-initialised last layers of a new one would
    make every output zero, and every comparison of outputs trivially pass."""
    torch.manual_seed(0)
    model = build_model(params).eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.copy_(0.3 * torch.randn_like(weight))
    return model


def diffusers_unet(model: UNet, params: Params) -> UNet2DModel:
    unet = UNet2DModel(**unet_config(params)).eval()
    unet.load_state_dict(unet_state_dict(model.state_dict(), params))  # strict: every weight
    return unet


ARCHITECTURES = {
    "params.yaml": to_dict(load_params("params.yaml")),
    "class-conditional": {**TINY, "model": {**TINY["model"], "num_classes": 3,
                                            "num_res_blocks": 2}},
    "rgb-32px": {"preprocess": {"image_size": 32, "channels": 3},
                 "model": {"base_channels": 8, "channel_mult": [1, 2, 2],
                           "attention_resolutions": [16, 8], "norm_groups": 4}},
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_diffusers_unet_computes_ours(name):
    params = from_dict(ARCHITECTURES[name], check_combinations=False)
    model = random_model(params)
    unet = diffusers_unet(model, params)
    c, size = params.preprocess.channels, params.preprocess.image_size
    x = torch.randn(3, c, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 17, params.diffusion.num_timesteps - 1])
    labels = torch.tensor([0, 2, 3]) if params.model.num_classes else None  # 3: the null class
    with torch.no_grad():
        ours, theirs = model(x, t, labels), unet(x, t, class_labels=labels).sample
    assert ours.abs().max() > 0.1  # random weights: the comparison is not between zeros
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine", "sigmoid", "exponential"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_diffusers_betas_are_ours(schedule, zero_snr):
    params = from_dict({"diffusion": {"schedule": schedule, "rescale_zero_terminal_snr": zero_snr,
                                      "prediction_type": "v_prediction"}})
    theirs = DDPMScheduler(**scheduler_config(params.diffusion, params.sample))
    ours = build_scheduler(params)
    # diffusers computes in float32, we in float64 rounded to float32: they differ in the last
    # bits, and by up to 5e-7 where zero terminal SNR's rescaling cancels digits in float32.
    torch.testing.assert_close(theirs.betas, ours.betas, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs.alphas_cumprod, ours.alphas_cumprod, rtol=0, atol=1e-6)


def export_tiny(tmp_path: Path, params: Params, *options: str) -> tuple[UNet, Path]:
    model = random_model(params)
    save_ema_model(tmp_path / EMA_FILE, params, model.state_dict(), ("a", "b", "c"), None, 9)
    export.main(["--model", str(tmp_path / EMA_FILE), "--out", str(tmp_path / "out"), *options])
    return model, tmp_path / "out"


def ours_in_01(x: torch.Tensor) -> torch.Tensor:
    return (x / 2 + 0.5).clamp(0, 1)  # DDPMPipeline's output range


@pytest.mark.parametrize(("diffusion", "options"), [
    ({"prediction_type": "epsilon"}, {}),
    ({"prediction_type": "v_prediction", "schedule": "cosine"},
     {"timestep_spacing": "leading", "variance_type": "fixed_large"}),
    ({"prediction_type": "sample", "schedule": "exponential"},
     {"timestep_spacing": "linspace", "clip_sample": False}),
])
def test_ddpm_pipeline_draws_our_ddpm_samples_from_the_same_noise(tmp_path, diffusion, options):
    """DDPMPipeline draws the initial noise and then one noise tensor per step from its generator,
    as our DDPM sampler does (the last step's draw, of zero variance, is its last): the same seed
    gives the same noise, so the same images. Our last step adds no noise (DDPM Algorithm 2);
    diffusers' too where that step is t = 0, as with leading spacing, the one where fixed_large
    can be compared."""
    params = tiny(diffusion=diffusion)
    args = [a for key, value in options.items() for a in
            (["--no-clip-sample"] if value is False else [f"--{key.replace('_', '-')}", value])]
    model, folder = export_tiny(tmp_path, params, *args)
    pipe = DDPMPipeline.from_pretrained(folder)
    theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(5), num_inference_steps=5,
                  output_type="pt").images
    sampling = {"timestep_spacing": "trailing", "variance_type": "fixed_small",
                "clip_sample": True, **options}
    ours = sample(model_fn(model, None), build_scheduler(params), (3, 1, 8, 8), method="ddpm",
                  num_steps=5, generator=torch.Generator().manual_seed(5), **sampling)
    assert theirs.std() > 0.05  # images, not a constant
    torch.testing.assert_close(theirs, ours_in_01(ours), rtol=0, atol=1e-4)


def test_ddim_scheduler_from_the_exported_config_samples_our_ddim(tmp_path):
    """Another diffusers scheduler from the same config. Unclipped: with clipping, diffusers' DDIM
    steps with the network's noise, ours with the noise re-derived from the clipped x0."""
    params = tiny()
    model, folder = export_tiny(tmp_path, params)
    pipe = DDPMPipeline.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(2), num_inference_steps=5,
                  output_type="pt").images
    ours = sample(model_fn(model, None), build_scheduler(params), (3, 1, 8, 8), method="ddim",
                  num_steps=5, eta=0.0, timestep_spacing="trailing", clip_sample=False,
                  generator=torch.Generator().manual_seed(2))
    assert theirs.std() > 0.05
    torch.testing.assert_close(theirs, ours_in_01(ours), rtol=0, atol=1e-4)


def test_a_class_conditional_export_samples_each_class_as_ours(tmp_path):
    """DDPMPipeline passes no labels: the loop it runs, with class_labels, as the model card says."""
    params = tiny(model={"num_classes": 3})
    model, folder = export_tiny(tmp_path, params)
    card = (folder / "README.md").read_text()
    assert "labels 0 to 2 are the classes in this order, label 3 is the null class" in card
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(5)
    labels = torch.tensor([0, 1, 2, 3])
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(4, 1, 8, 8, generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x,
                               generator=generator).prev_sample
    ours = sample(model_fn(model, labels), build_scheduler(params), (4, 1, 8, 8), num_steps=5,
                  timestep_spacing="trailing", generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(x, ours, rtol=0, atol=1e-4)
    assert (x[0] - x[1]).abs().max() > 0.05  # the label matters


def test_the_model_cards_loading_code_runs(tmp_path):
    params = tiny(model={"num_classes": 3})
    _, folder = export_tiny(tmp_path, params)
    card = (folder / "README.md").read_text()
    assert "Trained by simple-diffusion for 9 steps on 8x8 images with 1 channel, of the " \
           "classes a, b, c." in card and "- MLflow run: none (untracked)" in card
    code = card.split("```python\n")[1].split("```")[0].replace("PATH/TO/THIS/FOLDER", str(folder))
    scope: dict = {}
    exec(code, scope)
    assert scope["images"].shape == (16, 1, 8, 8)
    assert 0 <= scope["images"].min() and scope["images"].max() <= 1


@pytest.mark.parametrize(("sections", "param"), [
    ({"model": {"self_condition": True}}, "model.self_condition = true"),
    ({"model": {"channel_mult": [2, 2]}}, "model.channel_mult = [2, 2]"),
    ({"model": {"channel_mult": [1, 2], "attention_resolutions": [8, 4]}},
     "model.attention_resolutions = [8, 4] puts attention at widths [8, 16]"),
    ({"diffusion": {"formulation": "edm"}}, "diffusion.formulation = 'edm'"),
])
def test_a_model_diffusers_cannot_express_is_refused_naming_the_param(tmp_path, sections, param):
    params = tiny(**sections)
    save_ema_model(tmp_path / EMA_FILE, params, build_model(params).state_dict(), (), None, 1)
    with pytest.raises(SystemExit) as exit:
        export.main(["--model", str(tmp_path / EMA_FILE), "--out", str(tmp_path / "out")])
    message = str(exit.value.code)
    assert message.startswith(f"export: error: --model {tmp_path / EMA_FILE}: diffusers cannot "
                              f"express this model: {param}")
    assert sorted(os.listdir(tmp_path)) == [EMA_FILE]  # no folder, no temporary left


def test_a_failed_export_leaves_nothing_and_an_existing_folder_is_kept(tmp_path, monkeypatch):
    params = tiny()
    save_ema_model(tmp_path / EMA_FILE, params, build_model(params).state_dict(), (), None, 1)
    monkeypatch.setattr(export, "model_card", lambda *a: 1 / 0)  # after the pipeline is written
    with pytest.raises(ZeroDivisionError):
        export.main(["--model", str(tmp_path / EMA_FILE), "--out", str(tmp_path / "out")])
    assert sorted(os.listdir(tmp_path)) == [EMA_FILE]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("kept")
    with pytest.raises(SystemExit) as exit:
        export.main(["--model", str(tmp_path / EMA_FILE), "--out", str(tmp_path / "out")])
    assert str(exit.value.code) == (f"export: error: --out {tmp_path / 'out'}: exists; remove it "
                                    f"or name a new folder")
    assert os.listdir(tmp_path / "out") == ["mine.txt"]


def test_without_diffusers_the_export_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers fails
    with pytest.raises(SystemExit) as exit:
        export.main(["--model", str(tmp_path / EMA_FILE), "--out", str(tmp_path / "out")])
    assert str(exit.value.code) == f"export: error: {export.INSTALL}"
    assert "uv sync --group bench" in export.INSTALL


def test_the_model_card_lists_the_runs_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # the store: tmp_path/mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = MlflowTracker(TrackingParams(experiment="test"))
    run = tracker.training_run(tiny())
    run.log_metrics({"classifier_fd": 12.5, "train/loss": 0.75}, step=3)
    run.log_metrics({"train/loss": 0.25}, step=9)  # the last value is the card's
    params = tiny()
    save_ema_model(tmp_path / EMA_FILE, params, build_model(params).state_dict(), (), run.id, 9)
    export.main(["--model", str(tmp_path / EMA_FILE), "--out", str(tmp_path / "out")])
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"- MLflow run: `{run.id}`" in card
    assert "| `classifier_fd` | 12.5 |\n| `train/loss` | 0.25 |" in card


def docs_export_section() -> tuple[str, str]:
    """docs/generate.md's export command and its Python example."""
    section = (ROOT / "docs/generate.md").read_text().split("## In diffusers")[1]
    command = section.split("```bash\n")[1].split("\n```")[0]
    return command, section.split("```python\n")[1].split("```")[0]


def test_the_docs_export_commands_run_as_written(tmp_path, monkeypatch):
    command, code = docs_export_section()
    assert command.startswith("uv run --group bench python -m pipeline.export --model "
                              "outputs/train/ema.safetensors ")
    params = tiny(diffusion={"num_timesteps": 50})  # the example's 50 DDPM steps
    save_ema_model(tmp_path / "outputs/train" / EMA_FILE, params, random_model(params).state_dict(),
                   (), None, 1)
    module, *args = shlex.split(command.removeprefix("uv run --group bench python -m "))
    assert module == "pipeline.export"
    monkeypatch.chdir(tmp_path)
    export.main(args)  # in this process: a subprocess would import torch and diffusers again
    scope: dict = {}
    exec(code, scope)
    assert len(scope["images"]) == 16 and scope["images"][0].size == (8, 8)
