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
