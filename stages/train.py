"""DVC stage `train`: train the diffusion model, logging to MLflow; write the EMA weights.

Outputs: outputs/train/ema.pt (EMA weights + what rebuilds the model), checkpoint.pt (persist:
an interrupted run resumes from it), metrics.json and history.csv (DVC metrics and plots).
"""

from pathlib import Path

from pipeline.config import check_data_size, load_params
from pipeline.data import ImageSet
from pipeline.io import save_json
from pipeline.tracking import Tracker
from pipeline.training import checkpoint_run_id, save_history, summary, train
from pipeline.unet import build_model, count_parameters
from stages import run

OUT = Path("outputs/train")


def main() -> None:
    params = load_params()
    data = ImageSet.load("outputs/preprocess/train.pt")
    check_data_size(params, len(data))
    tracker = Tracker(params.tracking)
    mlflow_run = tracker.training_run(params, checkpoint_run_id(OUT / "checkpoint.pt", params, data))
    print(f"train: MLflow run {mlflow_run.id} in {tracker.uri}")
    try:
        state = train(params, data, OUT, mlflow_run, run_id=mlflow_run.id)
    except BaseException:
        mlflow_run.finish("KILLED")  # a later `dvc repro` resumes from the checkpoint and this run
        raise
    metrics = summary(state, count_parameters(build_model(params)))
    save_history(OUT / "history.csv", state.history)
    save_json(metrics, OUT / "metrics.json")
    mlflow_run.log_metrics({f"train/{k}": v for k, v in metrics.items()}, state.step)
    mlflow_run.finish()
    print(f"train: {state.step} steps, final loss {metrics['final_loss']:.4f}, "
          f"{metrics['images_per_s']:.0f} images/s")


if __name__ == "__main__":
    run("train", main)
