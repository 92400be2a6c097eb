"""Benchmark: training images/s with batches streamed from memory-mapped images (pipeline/batches.py)
against the training images held in memory, optionally by another revision's code (today's path).

    uv run --frozen python -m bench.streaming [--steps 100] [--repeats 3] [--baseline main]

Both arms run `pipeline.training.train` on params.yaml's default run for --steps steps, in fresh
processes, alternately (A, B, A, B, ...), so that drift of a shared machine's load hits both
alike. The data is the training set outputs/preprocess/train/ (MNIST after `dvc repro
preprocess`): arm "in memory" reads its images.npy into RAM in full; arm "memory-mapped" maps
it with `np.load(mmap_mode="c")`, as ImageSet.load does. Each arm builds its ImageSet from the
arrays itself, so that with --baseline REV the in-memory arm can run REV's code (`git archive`
into a temporary folder), e.g. 26a0210, the code before streaming, which put the whole set on
the device. The figure of a process is the
images/s of the second half of its steps (the first half warms up oneDNN and the page cache);
the precision is fixed (--precision), since `auto` would time both in every process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(job: dict) -> dict:
    """One timed run of `job` with the code under job["root"]; images/s of its second half."""
    sys.path.insert(0, job["root"])
    import numpy as np
    import torch

    from pipeline.config import from_dict, load_params, to_dict
    from pipeline.data import ImageSet
    from pipeline.logger import Logger
    from pipeline.training import train

    raw = to_dict(load_params(job["params"]))
    steps = job["steps"]
    raw["train"].update(steps=steps, log_every=steps // 2, sample_every=10 * steps,
                        checkpoint_every=10 * steps, precision=job["precision"])
    folder = Path(job["data"])
    images = np.load(folder / "images.npy", mmap_mode="c" if job["mapped"] else None)
    data = ImageSet(torch.from_numpy(images), torch.from_numpy(np.load(folder / "labels.npy")),
                    tuple(json.loads((folder / "classes.json").read_text())))
    with tempfile.TemporaryDirectory() as out:
        state = train(from_dict(raw), data, Path(out), Logger())
    return {"images_per_s": state.history[-1]["images_per_s"]}


def run(job: dict) -> float:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                         capture_output=True, text=True, cwd=job["root"])
    if out.returncode:
        sys.exit(f"bench.streaming: {job}\n{out.stderr}")
    return json.loads(out.stdout.splitlines()[-1])["images_per_s"]


def baseline_tree(rev: str, folder: Path) -> Path:
    """The code of git revision `rev`, exported (not checked out) into folder."""
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", help="git revision whose code runs the in-memory arm")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--data", type=Path, default=ROOT / "outputs/preprocess/train")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/bench_streaming.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    sys.path.insert(0, str(ROOT))
    from bench.__main__ import cpu_name

    with tempfile.TemporaryDirectory() as tmp:
        code = {"in memory": str(ROOT), "memory-mapped": str(ROOT)}
        if args.baseline:
            (Path(tmp) / "baseline").mkdir()
            code["in memory"] = str(baseline_tree(args.baseline, Path(tmp) / "baseline"))
        job = {"params": str(ROOT / "params.yaml"), "data": str(args.data.resolve()),
               "steps": args.steps, "precision": args.precision}
        runs = {arm: [] for arm in code}
        load_before = os.getloadavg()
        for _ in range(args.repeats):
            for arm, root in code.items():
                runs[arm].append(run({**job, "root": root, "mapped": arm == "memory-mapped"}))
                print(f"{arm:13s} {runs[arm][-1]:7.1f} images/s", flush=True)
    medians = {arm: statistics.median(r) for arm, r in runs.items()}
    report = {"cpu": cpu_name(), "cpus": os.cpu_count(), "command": " ".join(sys.argv),
              "baseline": args.baseline or "this tree", "steps": args.steps,
              "precision": args.precision, "runs": runs, "median_images_per_s": medians,
              "ratio": medians["memory-mapped"] / medians["in memory"],
              "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    print(json.dumps(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
