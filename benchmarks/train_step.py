"""Benchmark: seconds per training step of the UNet on this machine, fp32 vs bf16 autocast.

    uv run python -m benchmarks.train_step [--batch 64] [--steps 10]

One step = forward, L_simple (MSE), backward, AdamW, as in pipeline/training.py. Prints the
median over `--steps` timed steps after 3 warm-up steps. Results go in docs/benchmarks.md.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.unet import UNet, count_parameters

CONFIGS = {  # name: UNet arguments for 28x28 grey images
    "default (16, [1,2,4])": dict(base_channels=16, channel_mult=(1, 2, 4)),
    "32, [1,2,2]": dict(base_channels=32, channel_mult=(1, 2, 2)),
    "16, [1,2,2]": dict(base_channels=16, channel_mult=(1, 2, 2)),
}


def seconds_per_step(model: UNet, batch: int, bf16: bool, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, 28, 28)
    t = torch.randint(0, 1000, (batch,))
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            prediction = model(x, t)
        loss = F.mse_loss(prediction.float(), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    for name, config in CONFIGS.items():
        model = UNet(1, 28, attention_resolutions=(7,), num_res_blocks=1, num_heads=4,
                     dropout=0.1, norm_groups=8, **config)
        fp32 = seconds_per_step(model, args.batch, False, args.steps)
        bf16 = seconds_per_step(model, args.batch, True, args.steps)
        print(f"{name:24s} {count_parameters(model):>9,} params  fp32 {fp32:.3f} s  "
              f"bf16 {bf16:.3f} s  ({fp32 / bf16:.2f}x)")


if __name__ == "__main__":
    main()
