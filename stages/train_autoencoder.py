"""DVC stage `train_autoencoder`: the KL autoencoder of latent diffusion, as its own MLflow run.

With model.space latent it trains pipeline/autoencoder.py's model on the preprocessed images
(pipeline/autoencoder_training.py) and writes outputs/autoencoder/model/ (autoencoder.safetensors,
with the latent scale; reconstructions.png) and outputs/autoencoder/metrics.json (held-out PSNR,
latent scale, and the floor of a latent model: reconstruction_classifier_fd/_kid, the classifier
FD/KID against the held-out set of its reconstructions of evaluate's floor images, beside
floor_classifier_fd/_kid of those images; also in the MLflow run). With model.space pixel nothing
needs it: the folder holds only not_needed.json, written at once, and the metrics are empty. Its
params are the autoencoder section, model.space, and what that floor shares with evaluate's
(sample.num_images, evaluate.kid_subset_size, batch_size and seed). These are no part of the run's
identity: a change to one re-runs the stage, which resumes its finished run from its last
checkpoint (kept until another autoencoder run completes), trains no step and scores again. So no
change to the diffusion's params retrains it. Checkpoints go to checkpoints/autoencoder/<run>
(stages/paths.py); SIGINT/SIGTERM write one, mark the MLflow run KILLED and exit with 128 + the
signal number, as the train stage does.
"""

import shutil

from pipeline.config import Params, check_data_size, load_params
from pipeline.io import atomic_folder, save_image, save_json
from stages import run
from stages.paths import (AUTOENCODER_CHECKPOINTS, AUTOENCODER_DIR, AUTOENCODER_METRICS,
                          CLASSIFIER, NO_AUTOENCODER, RECONSTRUCTIONS, REFERENCE_SET, TRAIN_SET)


def main() -> None:
    params = load_params()
    shutil.rmtree(AUTOENCODER_DIR, ignore_errors=True)  # as DVC does before it runs a stage
    if params.model.space != "latent":
        with atomic_folder(AUTOENCODER_DIR) as folder:
            save_json({"model.space": params.model.space, "autoencoder": None},
                      folder / NO_AUTOENCODER.name)
        save_json({}, AUTOENCODER_METRICS)
        print(f"train_autoencoder: model.space is {params.model.space!r}: no autoencoder needed")
        return
    train_and_record(params)


def train_and_record(params: Params) -> None:
    # Imported here: the pixel-space marker above needs none of these, and MLflow's import is most
    # of a stage's start-up, paid by every pixel-space `dvc repro` for nothing (docs/benchmarks.md).
    from pipeline.autoencoder_training import (fingerprint, reconstruction_floor, train_autoencoder,
                                               training_code)
    from pipeline.checkpoint import Checkpoints
    from pipeline.classifier import load_classifier
    from pipeline.data import ImageSet
    from pipeline.loop import marked_on_failure
    from pipeline.tracking import connect

    data, reference = ImageSet.load(TRAIN_SET), ImageSet.load(REFERENCE_SET)
    check_data_size(params, len(data), "autoencoder")
    load_classifier(CLASSIFIER)  # a missing or broken classifier fails here, before the training
    checkpoints = Checkpoints(AUTOENCODER_CHECKPOINTS, fingerprint(params, data),
                              training_code("stages/train_autoencoder.py"))
    checkpoints.drop_if_made_by_other_code()
    tracker = connect(params.tracking)  # an unreachable store fails here, before any work
    mlflow_run = tracker.autoencoder_run(params, checkpoints.run_id())
    checkpoints.set_run_id(mlflow_run.id)
    print(f"train_autoencoder: MLflow run {mlflow_run.id} in {tracker.uri}")
    with (marked_on_failure(mlflow_run, "train_autoencoder"),
          atomic_folder(AUTOENCODER_DIR) as folder):
        result = train_autoencoder(params, data, reference, folder, mlflow_run, checkpoints,
                                   run_id=mlflow_run.id)
        save_image(result.grid, folder / RECONSTRUCTIONS.name)
        floor = reconstruction_floor(result.model, params, data, reference, CLASSIFIER)
        # Each time: a re-run for a changed sample.num_images or evaluate key logs its new value.
        mlflow_run.log_metrics(floor, result.state.step)
    save_json({"psnr": result.psnr, "latent_scale": result.latent_scale,
               "steps": result.state.step, **floor}, AUTOENCODER_METRICS)
    mlflow_run.finish()
    checkpoints.complete()
    print(f"train_autoencoder: {result.state.step} steps, held-out PSNR {result.psnr:.2f} dB, "
          f"latent scale {result.latent_scale:.4g}, classifier FD of the reconstructions "
          f"{floor['reconstruction_classifier_fd']:.4g} (of the training images "
          f"{floor['floor_classifier_fd']:.4g})")


if __name__ == "__main__":
    run("train_autoencoder", main)
