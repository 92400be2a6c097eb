"""DVC stage `preprocess`: the image folder -> outputs/preprocess/{train,reference}.pt.

Reads only `preprocess.*` params. The reference set is the held-out split that evaluate
compares samples with. A bad image is a one-line error naming it, or, with
`preprocess.on_bad_image: skip`, a warning on stderr and part of the skipped count printed here.
"""

from pathlib import Path

from pipeline.config import load_params
from pipeline.data import build_datasets, summary
from stages import run

OUT = Path("outputs/preprocess")


def main() -> None:
    params = load_params().preprocess
    train, reference, skipped = build_datasets(params)
    train.save(OUT / "train.pt")
    reference.save(OUT / "reference.pt")
    print(summary(train, reference, params, skipped))


if __name__ == "__main__":
    run("preprocess", main)
