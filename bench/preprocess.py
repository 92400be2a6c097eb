"""Preprocessing throughput and memory: an archive of JPEGs at 64x64 RGB (upscaled: CIFAR-10 is 32 px), with 1 and all
workers; the figures of docs/benchmarks.md.

    uv run --frozen --group bench python -m bench.preprocess \
        [--data /work/shared/datasets/cifar10_jpg.tar.gz] [--workers 1,0] [--out outputs/bench-preprocess.json]

Each run is a fresh process (`python -m stages.preprocess`'s work, pipeline.data.build_datasets)
writing into a temporary folder. Its peak memory is that of the whole process tree, the worker
processes included, sampled every 50 ms (psutil): the sum of the resident set sizes (RSS, which
counts the pages that forked workers share with the parent once per process) and the sum of the
proportional set sizes (PSS, which splits shared pages among the processes: what the machine
holds). `base` is the parent's RSS once its imports are done, before the first image: importing
torch alone is some 600 MB, so the growth over it is what the data costs.
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
                     max_reference_images=100000, allow_upscale=True, workers=int(sys.argv[2]))
print(open("/proc/self/status").read().split("VmRSS:")[1].split()[0], flush=True)  # kB
start = time.perf_counter()
train, reference, _ = build_datasets(p, Path(sys.argv[3]) / "train", Path(sys.argv[3]) / "reference")
print(len(train) + len(reference), time.perf_counter() - start, train.images.nbytes + reference.images.nbytes)
"""


def tree_memory(process: psutil.Process) -> tuple[int, int]:
    """The summed RSS and PSS bytes of a process and all its descendants, now."""
    rss = pss = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss, pss = rss + info.rss, pss + info.pss
    return rss, pss


def run(data: str, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        child = subprocess.Popen([sys.executable, "-c", CHILD, data, str(workers), out],
                                 stdout=subprocess.PIPE, text=True)
        process, peak_rss, peak_pss = psutil.Process(child.pid), 0, 0
        while child.poll() is None:
            try:
                rss, pss = tree_memory(process)
            except psutil.NoSuchProcess:
                break
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.05)
        stdout = child.stdout.read()
        if child.returncode:
            sys.exit(f"bench.preprocess: the run with {workers} workers failed")
    base_kb, images, seconds, pixel_bytes = stdout.split()
    return {"workers": workers, "images": int(images), "seconds": round(float(seconds), 2),
            "images_per_s": round(int(images) / float(seconds), 1),
            "base_rss_mb": round(int(base_kb) * 1024 / 1e6, 1),
            "peak_tree_rss_mb": round(peak_rss / 1e6, 1), "peak_tree_pss_mb": round(peak_pss / 1e6, 1),
            "pixels_mb": round(int(pixel_bytes) / 1e6, 1)}


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
              f"{result['images_per_s']} images/s; process tree peak RSS "
              f"{result['peak_tree_rss_mb']} MB, PSS {result['peak_tree_pss_mb']} MB (base "
              f"{result['base_rss_mb']} MB after imports; pixels written "
              f"{result['pixels_mb']} MB) on {results['cpu']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
