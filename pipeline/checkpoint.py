"""Training checkpoints that survive kills, full disks, corrupt files and `dvc exp run`.

Every run has its own folder, `<root>/<identity>/`, named by the identity of its run (a hash of
the params that shape the model and its training, and of the training images). The train stage's
root is `checkpoints/` in the main repository (pipeline.io.project_root), outside every DVC
output: `dvc exp run` puts the outputs of the baseline back before it runs, and its --temp and
queued runs work in temporary copies, so checkpoints that DVC managed were lost or never seen.
Here each kind of run finds the checkpoints of the same params and data, and resumes.

In the folder, checkpoints are files named by step and run, `step-00000500-<identity>.pt`. Each
is written atomically (pipeline/io.py), records its identity in its name and its contents, and is
loaded with `weights_only=True`, so a crafted file cannot run code. The newest `KEEP` are kept: if
the newest cannot be read anyway (a disk that lied about fsync, a copy cut short), `load` says so
and falls back to the one before it. `run.json` beside them names the tracking run as soon as
that run exists, so that a run killed before its first checkpoint is also continued, not
duplicated. When a run completes, `complete` marks its folder and removes the folders of other
completed runs; those of interrupted runs stay until they are resumed and complete.

The identity is of params and data, not of code, so that an interrupted run resumes after an edit
(it says so if the code it began under was other). A finished run is handed back only under the
code that made it: every checkpoint and the mark of completion record `code`, a digest of the code
the training runs (pipeline/code_digest.py), and `drop_if_made_by_other_code` removes a finished
run of other code before the stage looks up its tracking run, so that it trains afresh.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.io import CorruptFileError, load_torch, save_json, save_torch

KEEP = 2
NAME = re.compile(r"step-(\d+)-([0-9a-f]+)\.pt")
ID_LENGTH = 16  # hex digits of the identity in a folder or file name
COMPLETE = "COMPLETE"  # marks the folder of a run that finished


class Checkpoints:
    """The checkpoint folder of one run under `root`: `identity` says which run it is, `code`
    which code trains it (a digest; see the module's docstring)."""

    def __init__(self, root: Path, identity: str, code: str = "") -> None:
        self.root, self.identity, self.code = Path(root), identity, code
        self.folder = self.root / identity[:ID_LENGTH]

    def paths(self) -> list[Path]:
        """The checkpoint files of any run, newest (highest step) first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := NAME.fullmatch(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def ours(self, path: Path) -> bool:
        match = NAME.fullmatch(path.name)
        return match is not None and match.group(2) == self.identity[:ID_LENGTH]

    def newest(self) -> Path | None:
        """This run's newest checkpoint file."""
        return next((p for p in self.paths() if self.ours(p)), None)

    def save(self, checkpoint: dict[str, Any], step: int) -> Path:
        """Write the checkpoint of `step`; then drop all but the newest KEEP of this run."""
        path = self.folder / f"step-{step:08d}-{self.identity[:ID_LENGTH]}.pt"
        save_torch({"identity": self.identity, "code": self.code, **checkpoint}, path)
        keep = [p for p in self.paths() if self.ours(p)][:KEEP]
        torn = self.folder.glob(".step-*.tmp")  # left by writes that a SIGKILL cut short
        for old in (set(self.paths()) - set(keep)) | set(torn):
            old.unlink()
        return path

    def load(self) -> dict[str, Any] | None:
        """The newest readable checkpoint of this run, or None (saying why) to start fresh."""
        (self.folder / COMPLETE).unlink(missing_ok=True)  # running again: not to be removed
        ours = [p for p in self.paths() if self.ours(p)]
        for path in ours:
            try:
                checkpoint = load_torch(path)
            except CorruptFileError as err:
                print(f"{err}; falling back to the checkpoint before it")
                continue
            if checkpoint.get("identity") != self.identity:  # a file renamed by hand
                raise ValueError(f"{path}: its name and its contents name different runs; "
                                 "move it out of the way")
            print(f"{path}: resuming at step {checkpoint['state']['step']}")
            if checkpoint.get("code") != self.code:
                print(f"{path}: the run began under other code; it goes on under this code "
                      f"(delete {self.folder} to start it over)")
            return checkpoint
        if ours:
            print(f"{self.folder}: no readable checkpoint of this run; starting a fresh run")
        return None

    def run_id(self) -> str | None:
        """The tracking run recorded for this identity, if any."""
        record = self.folder / "run.json"
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError):
            return None
        return saved.get("run_id") if saved.get("identity") == self.identity else None

    def set_run_id(self, run_id: str | None) -> None:
        save_json({"identity": self.identity, "run_id": run_id}, self.folder / "run.json")

    def drop_if_made_by_other_code(self) -> None:
        """Remove this run's folder if the run finished under other code (or under code that
        recorded none): its model is not what this code trains. Call it before `run_id`, so the
        new training gets its own tracking run, and before any process loads a checkpoint."""
        mark = self.folder / COMPLETE
        if not mark.is_file():  # not finished: an interrupted run resumes under any code
            return
        try:
            code = json.loads(mark.read_text())["code"]
        except (ValueError, KeyError, TypeError):  # a mark from before `code`, or unreadable
            code = None
        if code != self.code:
            shutil.rmtree(self.folder)
            print(f"{self.folder}: a finished run of other code; training again from step 0")

    def complete(self) -> None:
        """Mark this run finished, and remove the folders of other finished runs."""
        save_json({"identity": self.identity, "code": self.code}, self.folder / COMPLETE)
        for folder in self.root.iterdir():
            if folder != self.folder and (folder / COMPLETE).is_file():
                shutil.rmtree(folder, ignore_errors=True)


def random_states(generator: torch.Generator) -> dict[str, Any]:
    """Every random state a training step draws from: the data/noise generator, CPU and CUDA."""
    states = {"generator": generator.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(states["generator"])
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
