"""DVC stage `train`: train the diffusion model, logging to MLflow; write the EMA weights.

Outputs: outputs/train/ema.safetensors (EMA weights + what rebuilds the model), metrics.json and
history.csv (DVC metrics and plots). With model.space latent it trains on the training images'
latents, which the train_autoencoder stage wrote, and the model file carries that autoencoder.
Checkpoints go to checkpoints/<run> in the main repository, outside DVC's outputs
(stages/paths.py): an interrupted run, also under `dvc exp run`, resumes from them in the same
MLflow run; a finished run is taken up again only under the code that trained it
(pipeline/checkpoint.py), else it trains again, in a new MLflow run. SIGINT/SIGTERM write a checkpoint, mark the MLflow run KILLED
and exit with 128 + the signal number; a diverged loss marks it FAILED.

With `train.num_processes` > 1 the stage starts itself again under torchrun, as that many
data-parallel ranks on this machine; started by torchrun (also across machines) it joins the
process group that torchrun describes. Only rank 0 talks to MLflow and writes the outputs.
"""

import os

from pipeline import distributed
from pipeline.autoencoder import load_autoencoder
from pipeline.checkpoint import Checkpoints
from pipeline.config import Params, check_classes, check_data_size, load_params
from pipeline.data import ImageSet
from pipeline.io import save_json
from pipeline.loop import marked_on_failure
from pipeline.model_logging import log_ema_model
from pipeline.plots import save_loss_curve
from pipeline.progress import TrainProgress
from pipeline.tracking import Run, TrainingCurves, connect
from pipeline.training import (TrainState, fingerprint, save_history, summary, train,
                               training_code)
from pipeline.unet import build_model, count_parameters
from stages import run
from stages.paths import (AUTOENCODER, CHECKPOINTS, EMA_MODEL, HISTORY, LATENTS, LOSS_CURVE,
                          TRAIN_DIR, TRAIN_METRICS, TRAIN_SET)

MODEL_TAG = "ema_model_uri"  # set once the EMA model is logged (and registered)


def main() -> None:
    params = load_params()
    if params.train.num_processes > 1 and not distributed.launched_by_torchrun():
        command = distributed.torchrun_command(params.train.num_processes, "stages.train")
        os.execv(command[0], command)  # torchrun exits non-zero if any rank fails
    world = distributed.setup()
    try:
        train_and_record(params, world)
    finally:
        distributed.teardown()


def train_and_record(params: Params, world: distributed.World) -> None:
    latent = params.model.space == "latent"  # then the images' latents, and what decodes them
    data = ImageSet.load(LATENTS, "train_autoencoder") if latent else ImageSet.load(TRAIN_SET)
    autoencoder = load_autoencoder(AUTOENCODER, world.device) if latent else None
    check_data_size(params, len(data))
    check_classes(params, data.classes)
    checkpoints = Checkpoints(CHECKPOINTS, fingerprint(params, data, world.size, autoencoder),
                              training_code("stages/train.py"))
    if world.is_main:
        checkpoints.drop_if_made_by_other_code()
    world.wait_for_main()  # no rank loads a checkpoint that rank 0 is about to drop
    if world.is_main:
        tracker = connect(params.tracking)  # an unreachable store fails here, before any work
        mlflow_run = tracker.training_run(params, checkpoints.run_id())
        checkpoints.set_run_id(mlflow_run.id)  # a kill before the first checkpoint keeps it too
        print(f"train: MLflow run {mlflow_run.id} in {tracker.uri}")
    else:
        mlflow_run = Run()  # records nothing: only rank 0 logs
    with marked_on_failure(mlflow_run, "train"):  # NonFiniteLoss keeps the last good checkpoint
        curves = TrainingCurves(mlflow_run)
        logger = TrainProgress(curves, params.train) if world.is_main else curves
        state = train(params, data, TRAIN_DIR, logger, run_id=mlflow_run.id, world=world,
                      checkpoints=checkpoints, autoencoder=autoencoder)
    if world.is_main:
        record(params, state, mlflow_run)
        checkpoints.complete()


def record(params: Params, state: TrainState, mlflow_run: Run) -> None:
    metrics = summary(state, count_parameters(build_model(params)))
    save_history(HISTORY, state.history)
    save_loss_curve(state.history, LOSS_CURVE)
    save_json(metrics, TRAIN_METRICS)
    if (mlflow_run.last_step("final_loss") or 0) < state.step:  # not after a late kill
        mlflow_run.log_metrics(metrics, state.step)
    model_uri = mlflow_run.tag(MODEL_TAG)
    if model_uri is None and mlflow_run.id is not None:  # once, also after a late kill
        model_uri = log_ema_model(mlflow_run, EMA_MODEL, params.tracking.registered_model)
        mlflow_run.set_tags({MODEL_TAG: model_uri})
    mlflow_run.finish()
    if model_uri:
        print(f"train: EMA model logged to MLflow as {model_uri}")
    print(f"train: {state.step} steps, final loss {metrics['final_loss']:.4f}, "
          f"{metrics['images_per_s']:.0f} images/s")


if __name__ == "__main__":
    run("train", main)
