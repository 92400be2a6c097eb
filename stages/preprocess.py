"""DVC stage `preprocess`: the image folder or archive -> outputs/preprocess/{train,reference}/.

Reads only `preprocess.*` params; each output is a folder that pipeline.data.ImageSet.load
memory-maps. The reference set is the held-out split that evaluate
compares samples with. A bad image is a one-line error naming it, or, with
`preprocess.on_bad_image: skip`, a warning on stderr and part of the skipped count printed here.
"""

from pipeline.config import load_params
from pipeline.data import build_datasets, summary
from stages import run
from stages.paths import REFERENCE_SET, TRAIN_SET


def main() -> None:
    params = load_params().preprocess
    train, reference, skipped = build_datasets(params, TRAIN_SET, REFERENCE_SET,
                                               show_progress=True)
    print(summary(train, reference, params, skipped))


if __name__ == "__main__":
    run("preprocess", main)
