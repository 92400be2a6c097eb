"""The project's code as files: what a module imports, and a digest of the code a run depends on.

A run's checkpoint identity (pipeline/training.py `fingerprint`) is of its params and data, so that
an interrupted run resumes after any edit. A finished run is different: taking it up again hands
back its model, which is right only if the code that made it has not changed since. So the
checkpoints record a `digest` of that code, the `closure` of the training module's imports and the
stage's script, and a finished run is taken up again only under the same digest
(pipeline/checkpoint.py).

Imports are read from the source (ast), all of them: module-level, function-level and under
TYPE_CHECKING. tests/test_architecture.py checks dvc.yaml's deps with the same closure.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the folder that holds the project's packages
PACKAGES = ("pipeline", "stages")
# Files a module reads as code without importing them: the MLflow model is logged from its
# source (pipeline.model_logging.MODEL_CODE), so what it runs is part of what train produces.
READS = {"pipeline/model_logging.py": ["pipeline/mlflow_model.py"]}


def module_file(name: str, root: Path = ROOT) -> str | None:
    """The project file of a module name (a package's __init__.py), None if not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if (root / candidate).is_file():
            return candidate.as_posix()
    return None


def imported_modules(tree: ast.AST) -> list[str]:
    """Every module an import statement anywhere in the tree names, with `from a import b` as
    both a and a.b (b may be a submodule)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def imports(file: str, root: Path = ROOT) -> set[str]:
    """The project files that `file` imports directly (and the packages they are in)."""
    tree = ast.parse((root / file).read_text(), filename=file)
    found = set(READS.get(file, []))
    for name in imported_modules(tree):
        parts = name.split(".")
        found.update(f for i in range(1, len(parts) + 1)
                     if (f := module_file(".".join(parts[:i]), root)))
    found.discard(file)
    return found


def closure(file: str, skip: Iterable[str] = (), root: Path = ROOT) -> set[str]:
    """`file` and the project files it imports, directly or not; the files in `skip` are not
    entered, so what only they import is left out with them."""
    seen, todo = set(skip), [file]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += imports(current, root)
    return seen - set(skip)


def digest(files: Iterable[str], root: Path = ROOT) -> str:
    """SHA-256 of the files' names and contents, in name order."""
    sha = hashlib.sha256()
    for file in sorted(files):
        content = (root / file).read_bytes()
        sha.update(f"{file}\0{len(content)}\0".encode())
        sha.update(content)
    return sha.hexdigest()
