"""DVC stage `preprocess`: the image folder -> outputs/preprocess/{train,reference}.pt.

Reads only `preprocess.*` params. The reference set is the held-out split that evaluate
compares samples with. A bad image is a one-line error naming it, or, with
`preprocess.on_bad_image: skip`, a warning on stderr and part of the skipped count printed here.
"""

from pipeline.config import load_params
from pipeline.data import build_datasets, summary
from stages import run
from stages.paths import REFERENCE_SET, TRAIN_SET


def main() -> None:
    params = load_params().preprocess
    train, reference, skipped = build_datasets(params)
    train.save(TRAIN_SET)
    reference.save(REFERENCE_SET)
    print(summary(train, reference, params, skipped))


if __name__ == "__main__":
    run("preprocess", main)
