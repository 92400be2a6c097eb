"""The trained EMA model as an MLflow pyfunc model, logged as "models from code".

MLflow runs this file to rebuild the model; nothing of it is pickled
(https://mlflow.org/docs/latest/ml/model/models-from-code/). Its one artifact, `ema`, is the EMA
weights file (pipeline/model_file.py), read with weights only: a crafted file is refused, never
run. pipeline.model_logging.log_ema_model logs it with the pipeline package as its code, so
it loads anywhere MLflow and torch are installed:

    model = mlflow.pyfunc.load_model("models:/simple-diffusion/latest")
    images = model.predict(pd.DataFrame([{"num_images": 16, "seed": 0, "method": "ddim",
                                          "num_steps": 50, "eta": 0.0, "guidance_scale": 0.0,
                                          "classes": ""}]))

Input: a table, one row per request, with the columns of the logged input example
(pipeline.model_request.example_request; `classes` comma-separated, "" = all). Output: the
images of every request in order, uint8 [N, H, W, C].

Not imported by the pipeline: set_model below registers the model when MLflow runs the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel, PythonModelContext

from pipeline.inference import generate
from pipeline.model_file import load_ema_model
from pipeline.model_request import request_params


class DiffusionModel(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        self.trained = load_ema_model(Path(context.artifacts["ema"]))

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> np.ndarray:
        # No progress bars: a served model's log is not a terminal.
        batches = [generate(self.trained, p, num_images=n, progress=False)[0]
                   for p, n in map(request_params, model_input.to_dict("records"))]
        return torch.cat(batches).permute(0, 2, 3, 1).numpy()


mlflow.models.set_model(DiffusionModel())
