"""One measurement in a fresh process: `python -m bench.worker JSON` prints one JSON line.

JSON holds impl ("project" | "reference"), task ("train" | "sample"), the config's params (as
pipeline.config.to_dict), batch, precision ("bf16" | "fp32"), device, and the step counts. A
fresh process per (impl, config, task) makes the peak memory honest: on CPU it is the peak
resident set minus the resident set after the imports, so it counts the weights, the optimiser
state, activations and the allocator's slack of this one measurement and nothing else. Linux
resets the peak (VmHWM) after the imports (/proc/self/clear_refs), since importing torch and
diffusers peaks higher than a small model ever does; elsewhere the peak is ru_maxrss. On CUDA it
is torch.cuda.max_memory_allocated.

Training, both models: pipeline.training.train_step (DDPM's L_simple, autocast, backward,
gradient clipping, AdamW with the config's lr and weight decay, the two .item() calls), so the
network is the only difference. Sampling: DDIM, 50 trailing steps, eta 0, clipped x0 in fp32 (the
sample stage runs no autocast): pipeline.sampler.sample for the project, and for the reference
what diffusers' DDIMPipeline does (DDIMScheduler.step under torch.no_grad).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench.models import BUILDERS, TINY, build, merge, params_of
from pipeline.noise_scheduler import NoiseScheduler, build_scheduler
from pipeline.sampler import sample
from pipeline.training import train_step

SAMPLE_STEPS = 50


class Reference(nn.Module):
    """UNet2DModel behind the project's model(x, t, labels) -> tensor call."""

    def __init__(self, unet: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.unet = unet
        self.num_classes = num_classes
        self.self_condition = False  # as pipeline.training.train_step asks the project's UNet

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None
                ) -> torch.Tensor:
        if labels is None and self.num_classes:  # the null class, as the project's UNet reads None
            labels = torch.full((len(x),), self.num_classes, dtype=torch.long, device=x.device)
        return self.unet(x, t, class_labels=labels).sample


def reset_peak_rss() -> int:
    """Start a new peak-RSS window; return the current resident set in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return proc_status("VmRSS")
    except OSError:  # not Linux: the peak since start is all there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB, macOS: B


def peak_rss() -> int:
    try:
        return proc_status("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_status(key: str) -> int:
    """A "kB" line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(model: nn.Module, job: dict, scheduler: NoiseScheduler,
                  device: torch.device) -> list[float]:
    p = params_of(job["params"]).train
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay,
                                  **job.get("optimizer", {}))
    generator = torch.Generator(device).manual_seed(0)
    shape = (job["batch"], model_channels(job), *[image_size(job)] * 2)
    x0 = torch.rand(shape, generator=generator, device=device) * 2 - 1
    model.train()
    times = []
    for i in range(job["warmup"] + job["repeats"]):
        start = time.perf_counter()
        train_step(model, scheduler, optimizer, x0, None, generator, p,
                   job["precision"] == "bf16")  # .item() inside: the step has finished
        if i >= job["warmup"]:
            times.append(time.perf_counter() - start)
    return times


def time_sampling(model: nn.Module, job: dict, scheduler: NoiseScheduler,
                  device: torch.device) -> list[float]:
    model.eval()
    shape = (job["batch"], model_channels(job), *[image_size(job)] * 2)
    run = project_sampling if job["impl"] == "project" else reference_sampling
    run(model, scheduler, shape, device, job["precision"], num_steps=2)  # warm-up
    times = []
    for _ in range(job["repeats"]):
        start = time.perf_counter()
        run(model, scheduler, shape, device, job["precision"], num_steps=SAMPLE_STEPS)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def project_sampling(model: nn.Module, scheduler: NoiseScheduler, shape: tuple, device,
                     precision: str, num_steps: int) -> torch.Tensor:
    generator = torch.Generator(device).manual_seed(0)
    with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
        return sample(lambda x, t: model(x, t), scheduler, shape, method="ddim",
                      num_steps=num_steps, timestep_spacing="trailing", generator=generator,
                      device=device)


def reference_sampling(model: nn.Module, scheduler: NoiseScheduler, shape: tuple, device,
                       precision: str, num_steps: int) -> torch.Tensor:
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(num_train_timesteps=scheduler.num_timesteps, beta_schedule="linear",
                         beta_start=1e-4, beta_end=0.02, clip_sample=True,
                         timestep_spacing="trailing")
    ddim.set_timesteps(num_steps)
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape, generator=generator, device=device)
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
        for t in ddim.timesteps:
            x = ddim.step(model(x, t), t, x, eta=0.0).prev_sample
    return x


def model_channels(job: dict) -> int:
    return job["params"]["preprocess"]["channels"]


def image_size(job: dict) -> int:
    return job["params"]["preprocess"]["image_size"]


def measure(job: dict) -> dict:
    device = torch.device(job["device"])
    params = params_of(job["params"])
    scheduler = build_scheduler(params)
    # Both implementations' lazy imports (diffusers loads parts on first model build) belong to
    # the baseline, not to the measurement: build a tiny model of each first.
    for impl in BUILDERS:
        build(impl, params_of(merge(job["params"], TINY)))
    baseline = reset_peak_rss()
    torch.manual_seed(0)
    model = build(job["impl"], params)
    if job["impl"] == "reference":
        model = Reference(model, params.model.num_classes)
    model.to(device)
    if job.get("compile"):
        model = torch.compile(model)
    timer = time_training if job["task"] == "train" else time_sampling
    times = timer(model, job, scheduler, device)
    seconds = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else peak_rss() - baseline)
    return {"images_per_s": job["batch"] / seconds, "seconds": seconds, "times": times,
            "peak_memory_mib": peak / 2**20}


if __name__ == "__main__":
    torch.set_num_threads(json.loads(sys.argv[1]).get("threads") or torch.get_num_threads())
    print(json.dumps(measure(json.loads(sys.argv[1]))))
