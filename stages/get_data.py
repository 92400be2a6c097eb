"""Fill data/ with the data set data.dvc pins (MNIST), or switch data/ to another mirrored set.

Not a DVC stage: it runs once on a fresh clone, before `dvc repro`.
    uv run python -m stages.get_data              # MNIST, verified against data.dvc
    uv run python -m stages.get_data cifar10      # CIFAR-10 into data/, re-pinned by `dvc add`
    uv run python -m stages.get_data mnist        # back to MNIST and data.dvc as shipped
The offline mirror folder comes from $SIMPLE_DIFFUSION_MIRROR (see pipeline/fetch.py).
"""

import argparse
import os

from pipeline.fetch import DEFAULT, MIRROR_ENV, SOURCES, get_data
from stages import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", default=DEFAULT, choices=sorted(SOURCES))
    parser.add_argument("--force", action="store_true",
                        help="replace data/ even if it holds changes not in the DVC cache")
    args = parser.parse_args()
    print(get_data(args.dataset, mirror=os.environ.get(MIRROR_ENV) or None, force=args.force))


if __name__ == "__main__":
    run("get_data", main)
