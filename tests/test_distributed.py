"""Data-parallel training: the World helpers, and two gloo processes started by the train stage
(`train.num_processes: 2`, through torchrun) against one process at the same global batch."""

import pytest
import torch

from pipeline.distributed import World, torchrun_command
from stage_project import finish, make_project, training_runs


def test_shards_split_the_global_batch_into_equal_contiguous_parts():
    parts = [World(rank, 4).shard(12) for rank in range(4)]
    assert [list(range(12))[s] for s in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert World().shard(12) == slice(0, 12)


def test_one_process_agrees_with_itself_without_communicating():
    assert World().agree(0.25, 15) == (0.25, 15)
    assert World().gather({"a": 1}) == [{"a": 1}]


def test_torchrun_command_starts_the_module_as_n_local_ranks():
    command = torchrun_command(3, "stages.train")
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                           "-m", "stages.train"]


@pytest.mark.slow
def test_two_gloo_processes_follow_the_one_process_loss_curve(tmp_path):
    """Same global batch, no dropout, fp32: the ranks see the same batches, timesteps and noise as
    the single process, so the curves differ only by the order of floating-point sums."""
    settings = {"model": {"dropout": 0.0}, "train": {"steps": 40, "checkpoint_every": 20}}
    single = make_project(tmp_path / "single", **settings)
    double = make_project(tmp_path / "double", model={"dropout": 0.0},
                          train={"steps": 40, "checkpoint_every": 20, "num_processes": 2})
    finish(single)
    log = finish(double)
    assert log.count("train: MLflow run") == 1  # only rank 0 talks to MLflow
    curves = []
    for project in (single, double):
        client, runs = training_runs(project)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        history = client.get_metric_history(runs[0].info.run_id, "train/loss")
        steps = [m.step for m in history]
        assert sorted(steps) == list(range(4, 41, 4))  # every step logged once, by one process
        curves.append(torch.tensor([m.value for m in sorted(history, key=lambda m: m.step)]))
    assert torch.allclose(curves[0], curves[1], rtol=1e-4, atol=0), curves
    assert not torch.equal(curves[0], curves[0].roll(1))  # a real curve, not a constant
    checkpoints = sorted((double / "checkpoints").glob("*/*.pt"))
    assert [p.name.split("-")[1] for p in checkpoints] == ["00000020", "00000040"]
    saved = torch.load(checkpoints[-1], weights_only=True)
    assert len(saved["random"]) == 2  # each rank's random state, for an exact resume
