"""The trained-model file (pipeline/model_file.py): safetensors with JSON metadata, no pickle; the
torch ema.pt of earlier versions still read."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from pipeline.config import from_dict
from pipeline.io import CorruptFileError, save_torch
from pipeline.model_file import EMA_FILE, load_ema_model, read_model_file, save_ema_model
from pipeline.unet import build_model

PARAMS = from_dict({"preprocess": {"image_size": 8, "channels": 3},
                    "model": {"base_channels": 8, "channel_mult": [1, 2],
                              "attention_resolutions": [4], "num_heads": 2, "norm_groups": 4,
                              "num_classes": 2},
                    "diffusion": {"num_timesteps": 20, "schedule": "cosine"}},
                   check_combinations=False)


def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: torch.randn_like(v) for k, v in build_model(PARAMS).state_dict().items()}


def test_the_file_is_safetensors_with_the_params_as_json_metadata(tmp_path):
    saved = weights()
    save_ema_model(tmp_path / EMA_FILE, PARAMS, saved, ("cat", "dog"), "abc123", 7)
    with safe_open(tmp_path / EMA_FILE, framework="pt") as f:  # any safetensors reader
        assert set(f.keys()) == set(saved)
        assert all(torch.equal(f.get_tensor(k), v) for k, v in saved.items())
        metadata = {key: json.loads(value) for key, value in f.metadata().items()}
    assert metadata["classes"] == ["cat", "dog"] and metadata["run_id"] == "abc123"
    assert metadata["step"] == 7 and metadata["params"]["preprocess"] == {"image_size": 8,
                                                                          "channels": 3}
    assert metadata["params"]["diffusion"]["schedule"] == "cosine"
    trained = load_ema_model(tmp_path / EMA_FILE, torch.device("cpu"))
    assert trained.classes == ("cat", "dog") and (trained.run_id, trained.step) == ("abc123", 7)
    assert trained.scheduler.num_timesteps == 20 and trained.model.num_classes == 2
    assert all(torch.equal(trained.model.state_dict()[k], v) for k, v in saved.items())


def test_the_file_others_read_has_the_usual_permissions(tmp_path):
    """safetensors makes its files 0600; the model file is for others too (a team's share)."""
    save_ema_model(tmp_path / EMA_FILE, PARAMS, weights(), ("cat", "dog"), "abc123", 7)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / EMA_FILE).stat().st_mode & 0o777 == 0o666 & ~umask

def test_the_torch_file_of_earlier_versions_is_still_read(tmp_path):
    saved = weights()
    sections = {"preprocess": {"image_size": 8, "channels": 3},
                "model": dict(base_channels=8, channel_mult=[1, 2], attention_resolutions=[4],
                              num_heads=2, norm_groups=4, num_classes=2),
                "diffusion": {"num_timesteps": 20, "schedule": "cosine"}}
    save_torch({"weights": saved, "params": sections, "classes": ["cat", "dog"], "run_id": None,
                "step": 3}, tmp_path / "ema.pt")
    old = read_model_file(tmp_path / "ema.pt")
    assert old.params == PARAMS and old.classes == ("cat", "dog") and old.step == 3
    assert all(torch.equal(old.weights[k], v) for k, v in saved.items())


def test_a_truncated_file_is_named(tmp_path):
    save_ema_model(tmp_path / EMA_FILE, PARAMS, weights(), (), None, 1)
    data = (tmp_path / EMA_FILE).read_bytes()
    (tmp_path / EMA_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=f"{tmp_path / EMA_FILE}: not a readable "
                                               "safetensors file"):
        read_model_file(tmp_path / EMA_FILE)
