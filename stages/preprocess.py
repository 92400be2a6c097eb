"""DVC stage `preprocess`: the image folder -> outputs/preprocess/{train,reference}.pt.

Reads only `preprocess.*` params. The reference set is the held-out split that evaluate
compares samples with.
"""

from pathlib import Path

from pipeline.config import load_params
from pipeline.data import build_datasets
from stages import run

OUT = Path("outputs/preprocess")


def main() -> None:
    params = load_params().preprocess
    train, reference = build_datasets(params)
    train.save(OUT / "train.pt")
    reference.save(OUT / "reference.pt")
    print(f"preprocess: {len(train)} training and {len(reference)} reference images, "
          f"{params.channels}x{params.image_size}x{params.image_size}, "
          f"{len(train.classes)} classes")


if __name__ == "__main__":
    run("preprocess", main)
