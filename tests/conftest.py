"""Session settings. Under pytest-xdist (`-n auto`: a worker per core) the cores are shared
among the workers, so each worker and the stage processes its tests start get cores / workers
threads: more would only make the workers' threads wait for each other."""

import os

import torch


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items):
    """The files with slow tests first, each file's tests kept together and in order.

    pytest-xdist's `--dist loadfile` hands out whole files in collection order (pyproject.toml
    turns off its default reordering, which puts the files with the most tests first: the many
    quick unit tests, leaving the few end-to-end files, minutes each, for last and one worker
    to run them while the other idles). Slow files first, the quick files fill the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
