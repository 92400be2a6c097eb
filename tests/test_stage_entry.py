"""stages.run, the entry point every stage's `python -m stages.<name>` goes through."""

import gc

import pytest

from stages import run


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()  # give this test process's objects back to the collector


def test_a_stage_runs_with_what_it_imported_frozen_out_of_the_collector(unfrozen):
    tracked_before = len(gc.get_objects())
    seen = []
    run("test", lambda: seen.append((gc.get_freeze_count(), len(gc.get_objects()))))
    frozen, left_to_collect = seen[0]
    assert frozen >= tracked_before > 10_000  # this process's imports: pytest's, the stages'
    assert left_to_collect < 100  # only what the call itself made


def test_bad_params_end_the_stage_with_one_line_naming_it(unfrozen):
    def main():
        raise ValueError("params.yaml: train.lr = -1.0 must be > 0")

    with pytest.raises(SystemExit) as stop:
        run("train", main)
    assert stop.value.code == "train: error: params.yaml: train.lr = -1.0 must be > 0"
