"""Ready configurations: presets/<name>.yaml as the `-S` options of `dvc exp run`.

Not a DVC stage: it prints options for one.
    uv run python -m stages.preset                 # list the presets and the data set each needs
    uv run python -m stages.preset cifar10         # its -S options (stdout); its data set (stderr)
    S=$(uv run python -m stages.preset cifar10) && uv run dvc exp run $S

A preset file holds a `preset:` section (`about`, one line; `data`, the argument of
`python -m stages.get_data`) and only the params keys that differ from params.yaml as shipped,
which are pipeline/config.py's defaults. The preset's params are those defaults with its keys, and
are checked like params.yaml (types, ranges, combinations) when the file is loaded.

The options set every key whose value in the current params.yaml differs from the preset's, so
applying one preset after another leaves nothing of the first behind. Only the settings of this
machine are left as they are (`KEPT`): where runs are tracked and where a weights file lies.
Values are written in the Hydra override grammar that `dvc exp run -S` reads: strings quoted, lists
without spaces, so that the shell's word splitting of `$S` keeps each option whole.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Params, ParamsError, flatten, from_dict, load_params
from pipeline.fetch import SOURCES
from stages import run

PRESETS = Path(__file__).resolve().parent.parent / "presets"
KEPT = ("tracking.", "evaluate.inception_weights")  # prefixes of keys a preset never sets


@dataclass(frozen=True)
class Preset:
    name: str
    about: str  # one line, for the list
    data: str  # the data set it trains on: `python -m stages.get_data <data>`
    params: Params  # params.yaml's defaults with the preset's keys


def preset_names(folder: Path = PRESETS) -> list[str]:
    return sorted(path.stem for path in folder.glob("*.yaml"))


def find_preset(name: str, folder: Path = PRESETS) -> Preset:
    """The preset presets/<name>.yaml; an unknown name is an error listing the known ones."""
    names = preset_names(folder)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ParamsError(f"unknown preset '{name}'; {hint}presets in {folder}: {', '.join(names)}")
    return load_preset(folder / f"{name}.yaml")


def load_preset(path: Path) -> Preset:
    """Read and check a preset file; a ParamsError names the file and the key."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ParamsError(f"expected a mapping of sections, got {type(raw).__name__}")
        about, data = _describe(raw.pop("preset", None))
        _reject_defaults(raw)
        params = from_dict(raw)
    except (OSError, yaml.YAMLError, ParamsError) as err:
        raise ParamsError(f"{path}: {err}") from None
    return Preset(path.stem, about, data, params)


def _describe(section: Any) -> tuple[str, str]:
    """The `preset:` section's (about, data)."""
    if not isinstance(section, dict) or set(section) != {"about", "data"}:
        raise ParamsError(f"the 'preset' section must hold exactly 'about' (one line) and 'data' "
                          f"(one of {', '.join(SOURCES)}); got {section!r}")
    if section["data"] not in SOURCES:
        raise ParamsError(f"preset.data = {section['data']!r} is not a data set of "
                          f"stages.get_data; choose one of {', '.join(SOURCES)}")
    return str(section["about"]), section["data"]


def _reject_defaults(raw: dict[str, Any]) -> None:
    """A preset lists only what it changes, so that reading it shows the whole difference."""
    defaults = flatten(Params())
    for section, values in raw.items():
        for key, value in (values.items() if isinstance(values, dict) else ()):
            typed = flatten(from_dict({section: {key: value}}, check_combinations=False))
            if typed[f"{section}.{key}"] == defaults[f"{section}.{key}"]:
                raise ParamsError(f"{section}.{key} = {value!r} is the default in params.yaml; "
                                  "leave it out, a preset holds only the keys it changes")


def set_options(preset: Preset, current: Params) -> list[str]:
    """`-S key=value` for every key where `current` differs from the preset (KEPT aside)."""
    target, now = flatten(preset.params), flatten(current)
    options = []
    for key, value in target.items():
        if value != now[key] and not key.startswith(KEPT):
            options += ["-S", f"{key}={override_value(key, value)}"]
    return options


def override_value(key: str, value: Any) -> str:
    """`value` in the Hydra override grammar of `dvc exp run -S`, as one shell word."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(key, item) for item in value) + "]"
    if isinstance(value, str):
        # Quoted, so that Hydra reads '' and '3' as strings; quotes and blanks cannot be kept.
        if "'" in value or any(c.isspace() for c in value):
            raise ParamsError(f"{key} = {value!r}: a preset value cannot hold quotes or blanks")
        return f"'{value}'"
    return repr(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="a preset; none: list them")
    args = parser.parse_args(argv)
    if args.name is None:
        for name in preset_names():
            preset = find_preset(name)
            print(f"{name:10} data: {preset.data:10} {preset.about}")
        return
    preset = find_preset(args.name)
    options = set_options(preset, load_params("params.yaml"))  # the file `dvc exp run -S` changes
    print(" ".join(options))
    print(f"preset {preset.name}: {len(options) // 2} keys differ from params.yaml; it trains on "
          f"{preset.data}, which `uv run python -m stages.get_data {preset.data}` puts in data/ "
          "(docs/presets.md says how to switch back)", file=sys.stderr)


if __name__ == "__main__":
    run("preset", main)
