"""Benchmark: the project's UNet against diffusers' UNet2DModel of the same architecture, and the
pipeline's fixed costs. Prints tables and writes them to a JSON file.

    uv run --frozen --group bench python -m bench [--quick] [--out outputs/bench.json]

For each configuration (bench/models.py: params.yaml's model, and the DDPM paper's CIFAR-10 UNet)
and task (train: images/s of fwd + bwd + AdamW steps after warm-up; sample: images/s of DDIM at 50
steps), each implementation runs in a fresh process (bench/worker.py, which also measures the
peak memory), alternately project, reference, project, reference, ..., so that drift of a shared
machine's load hits both alike. The tables give the median of the repetitions and the ratio
project / reference of those medians, with os.getloadavg() before and after. Then the arithmetic
throughput (FLOPs counted by torch's FlopCounterMode) as a share of the device's measured bf16
matmul rate, and bench/pipeline_times.py's stage start-up and no-op `dvc repro` times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench.flops import flops_per_image, matmul_flops_per_s
from bench.models import configs, parameter_counts
from bench.pipeline_times import pipeline_figures
from pipeline.config import to_dict
from pipeline.device import default_device, fixed_precision

IMPLS = ("project", "reference")


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "cpu": cpu_name(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except ImportError:
        sys.exit("bench: diffusers is missing; run `uv run --frozen --group bench python -m bench`")
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_worker(job: dict, project_options: dict) -> dict:
    if job["impl"] == "project":
        job = {**job, **project_options}
    out = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(job)],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"bench: {job['impl']} {job['task']} failed:\n{out.stderr}")
    return json.loads(out.stdout.splitlines()[-1])


def measure_pair(base_job: dict, repeats: int, project_options: dict) -> dict:
    """A, B, A, B ...: `repeats` fresh processes per implementation, medians and their ratio."""
    runs = {impl: [] for impl in IMPLS}
    load_before = os.getloadavg()
    for _ in range(repeats):
        for impl in IMPLS:
            runs[impl].append(run_worker({**base_job, "impl": impl}, project_options))
    result = {"batch": base_job["batch"], "precision": base_job["precision"],
              "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    for key in ("images_per_s", "peak_memory_mib"):
        medians = {impl: statistics.median(r[key] for r in runs[impl]) for impl in IMPLS}
        ratio = medians["project"] / medians["reference"] if medians["reference"] else None
        result[key] = {**medians, "ratio": ratio}
    result["runs"] = runs
    return result


def precisions(choice: str, params, device: torch.device) -> dict[str, list[str]]:
    """Per task, the precisions to measure: "auto" is what the pipeline does (train.precision
    and sample.precision as they resolve on this device; both where the pipeline would time
    both, "auto" on a CPU), "both" is fp32 and bf16."""
    if choice == "both":
        return {"train": ["fp32", "bf16"], "sample": ["fp32", "bf16"]}
    if choice == "auto":
        return {task: [fixed] if (fixed := fixed_precision(precision, device)) else
                ["fp32", "bf16"] for task, precision in (("train", params.train.precision),
                                                       ("sample", params.sample.precision))}
    return {"train": [choice], "sample": [choice]}


def as_ratio(ratio: float | None) -> str:
    return "   n/a" if ratio is None else f"x{ratio:5.2f}"


def print_table(name: str, task: str, result: dict) -> None:
    ips, mem = result["images_per_s"], result["peak_memory_mib"]
    load = ", ".join(f"{x:.1f}" for x in result["loadavg_before"] + result["loadavg_after"][:1])
    print(f"{name:8s} {task:6s} {result['precision']:4s} batch {result['batch']:3d} | "
          f"images/s {ips['project']:8.2f} {ips['reference']:8.2f} {as_ratio(ips['ratio'])} | "
          f"peak MiB {mem['project']:7.1f} {mem['reference']:7.1f} {as_ratio(mem['ratio'])} | "
          f"load {load}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, one repetition")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench.json"))
    parser.add_argument("--params", default="params.yaml", help="the default config's params")
    parser.add_argument("--repeats", type=int, help="processes per implementation (default 3)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "both"), default="auto")
    parser.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    parser.add_argument("--configs", default="default,cifar10")
    parser.add_argument("--tasks", default="train,sample")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the pipeline figures")
    # Proposals for pipeline/training.py, measured on the project side only:
    parser.add_argument("--fused-adamw", action="store_true", help="project: AdamW(fused=True)")
    parser.add_argument("--compile", action="store_true", help="project: torch.compile(model)")
    args = parser.parse_args()
    device = default_device() if args.device == "auto" else torch.device(args.device)
    repeats = args.repeats or (1 if args.quick else 3)
    steps = {"train": (1, 2) if args.quick else (3, 5), "sample": (1, 1)}  # (warm-up, timed)

    project_options = {"optimizer": {"fused": True} if args.fused_adamw else {},
                       "compile": args.compile}
    report = {"machine": machine(device), "command": " ".join(sys.argv), "repeats": repeats,
              "project_options": project_options,
              "matmul_bf16_tflop_per_s": matmul_flops_per_s(device, args.quick) / 1e12,
              "configs": {}}
    print(json.dumps(report["machine"]))
    print(f"bf16 matmul: {report['matmul_bf16_tflop_per_s'] * 1e3:.2f} GFLOP/s on {device}")
    print("config   task   prec batch     | images/s project reference ratio | "
          "peak MiB project reference ratio | load before (1, 5, 15 min), after")
    for name, config in configs(device.type, args.params, args.quick).items():
        if name not in args.configs.split(","):
            continue
        counts = parameter_counts(config.params)
        entry = {"model": to_dict(config.params)["model"],
                 "image_size": config.params.preprocess.image_size,
                 "channels": config.params.preprocess.channels,
                 "parameters": counts, "tasks": {}}
        print(f"{name}: parameters project {counts['project']:,}, reference "
              f"{counts['reference']:,}")
        for task, task_precisions in precisions(args.precision, config.params, device).items():
            if task not in args.tasks.split(","):
                continue
            batch = config.train_batch if task == "train" else config.sample_batch
            flops = flops_per_image(config.params, task)
            for precision in task_precisions:
                warmup, timed = steps[task]
                job = {"task": task, "params": to_dict(config.params), "batch": batch,
                       "precision": precision, "device": str(device), "warmup": warmup,
                       "repeats": timed}
                result = measure_pair(job, repeats, project_options)
                result["gflop_per_image"] = flops / 1e9
                result["matmul_share"] = {
                    impl: flops * result["images_per_s"][impl]
                    / (report["matmul_bf16_tflop_per_s"] * 1e12) for impl in IMPLS}
                entry["tasks"][f"{task}_{precision}"] = result
                print_table(name, task, result)
        report["configs"][name] = entry

    if not args.no_pipeline:
        figures = pipeline_figures(Path.cwd(), repeats, 100 if args.quick else None)
        report["pipeline"] = figures
        print("stage start-up (s): " + ", ".join(
            f"{stage} {s:.1f}" for stage, s in figures["stage_startup_s"].items()))
        print(f"no-op dvc repro: {figures['noop_repro_s']:.1f} s in {figures['noop_repro_where']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
