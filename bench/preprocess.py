"""Preprocessing throughput and memory: an archive of JPEGs at 64x64 RGB, with 1 and with all
workers, the figures of docs/benchmarks.md.

    uv run --frozen --group bench python -m bench.preprocess \
        [--data /work/shared/datasets/cifar10_jpg.tar.gz] [--workers 1,0] [--out outputs/bench-preprocess.json]

Each run is a fresh process (`python -m stages.preprocess`'s work, pipeline.data.build_datasets)
writing into a temporary folder. Its peak memory is that of the whole process tree, the worker
processes included: the sum of the tree's resident set sizes, sampled every 20 ms (psutil), which
is what a machine must hold; ru_maxrss would give only the largest single process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.__main__ import cpu_name

CHILD = """
import sys, time
from pathlib import Path
from pipeline.config import PreprocessParams
from pipeline.data import build_datasets
p = PreprocessParams(data_dir=sys.argv[1], image_size=64, channels=3, test_split="test",
                     max_reference_images=100000, workers=int(sys.argv[2]))
start = time.perf_counter()
train, reference, _ = build_datasets(p, Path(sys.argv[3]) / "train", Path(sys.argv[3]) / "reference")
print(len(train) + len(reference), time.perf_counter() - start, train.images.nbytes + reference.images.nbytes)
"""


def tree_rss(process: psutil.Process) -> int:
    """The resident bytes of a process and all its descendants, now."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run(data: str, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        child = subprocess.Popen([sys.executable, "-c", CHILD, data, str(workers), out],
                                 stdout=subprocess.PIPE, text=True)
        process, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            try:
                peak = max(peak, tree_rss(process))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
        stdout = child.stdout.read()
        if child.returncode:
            sys.exit(f"bench.preprocess: the run with {workers} workers failed")
    images, seconds, pixel_bytes = stdout.split()
    return {"workers": workers, "images": int(images), "seconds": round(float(seconds), 2),
            "images_per_s": round(int(images) / float(seconds), 1),
            "peak_rss_mb": round(peak / 1e6, 1), "pixels_mb": round(int(pixel_bytes) / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/datasets/cifar10_jpg.tar.gz")
    parser.add_argument("--workers", default="1,0", help="comma-separated; 0 = every core")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-preprocess.json"))
    args = parser.parse_args()
    results = {"cpu": cpu_name(), "cores": len(psutil.Process().cpu_affinity()),
               "data": args.data, "runs": []}
    for workers in map(int, args.workers.split(",")):
        result = run(args.data, workers)
        results["runs"].append(result)
        print(f"workers {workers}: {result['images']} images in {result['seconds']} s, "
              f"{result['images_per_s']} images/s, peak RSS {result['peak_rss_mb']} MB "
              f"(pixels written: {result['pixels_mb']} MB) on {results['cpu']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
