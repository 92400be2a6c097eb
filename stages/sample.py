"""DVC stage `sample`: the trained EMA model generates sample.num_images PNGs under samples/.

Also writes outputs/sample/grid.png (the first 64), progression.png (denoising progression: the
x0 prediction of 8 samples over the sampling steps) and labels.json (the class each sample was
drawn for, by a class-conditional model; null for an unconditional one), which evaluate checks
the samples against.
"""

from pathlib import Path

from pipeline.config import load_params
from pipeline.data import grid_image
from pipeline.generate import (draw_labels, generate, load_ema_model, progression_image,
                               write_samples)
from pipeline.io import save_image, save_json
from stages import run

OUT = Path("outputs/sample")


def main() -> None:
    params = load_params().sample
    trained = load_ema_model(Path("outputs/train/ema.pt"))
    labels = draw_labels(trained, params, params.num_images)
    images, intermediates = generate(trained, params, return_intermediates=True, labels=labels)
    write_samples(images, Path("samples"))
    save_json({"classes": list(trained.classes),
               "labels": None if labels is None else labels.tolist()}, OUT / "labels.json")
    save_image(grid_image(images[:64]), OUT / "grid.png")
    save_image(progression_image(intermediates), OUT / "progression.png")
    print(f"sample: {len(images)} images with {params.method}, {params.num_steps} steps")


if __name__ == "__main__":
    run("sample", main)
