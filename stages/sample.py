"""DVC stage `sample`: the trained EMA model generates sample.num_images PNGs under samples/.

Also writes outputs/sample/grid.png (the first 64), progression.png (denoising progression: the
x0 prediction of 8 samples over the sampling steps) and labels.json (the class each sample was
drawn for, by a class-conditional model; null for an unconditional one), which evaluate checks
the samples against.
"""

from pipeline.config import load_params
from pipeline.data import grid_image
from pipeline.inference import (PROGRESSION_ROWS, draw_labels, generate, progression_image,
                                write_samples)
from pipeline.io import save_image, save_json
from pipeline.model_file import load_ema_model
from stages import run
from stages.paths import EMA_MODEL, PROGRESSION, SAMPLE_GRID, SAMPLE_LABELS, SAMPLES


def main() -> None:
    params = load_params().sample
    trained = load_ema_model(EMA_MODEL)
    labels = draw_labels(trained, params, params.num_images)
    images, intermediates = generate(trained, params, return_intermediates=True, labels=labels,
                                     intermediate_images=PROGRESSION_ROWS)
    write_samples(images, SAMPLES)
    save_json({"classes": list(trained.classes),
               "labels": None if labels is None else labels.tolist()}, SAMPLE_LABELS)
    save_image(grid_image(images[:64]), SAMPLE_GRID)
    save_image(progression_image(intermediates), PROGRESSION)
    print(f"sample: {len(images)} images with {params.method}, {params.num_steps} steps")


if __name__ == "__main__":
    run("sample", main)
