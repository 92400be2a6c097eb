"""Smoke test of `python -m bench --quick`: the JSON's structure, and that every ratio is
project / reference of the numbers it prints (needs the bench group: diffusers)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^(\w+)\s+(train|sample)\s+(bf16|fp32) batch\s+(\d+) \| images/s\s+([\d.]+)\s+"
                 r"([\d.]+) x\s*([\d.]+) \| peak MiB\s+([\d.]+)\s+([\d.]+) x\s*([\d.]+) \|")


def measured(precision: str) -> set[str]:
    return {"fp32", "bf16"} if precision == "auto" else {precision}


@pytest.mark.slow
def test_quick_bench_reports_consistent_ratios(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--configs", "default",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())

    assert report["machine"]["device"] == "cpu" and report["machine"]["diffusers"]
    assert report["matmul_bf16_tflop_per_s"] > 0
    default = report["configs"]["default"]
    assert default["parameters"]["project"] == default["parameters"]["reference"] > 0
    # The precisions the pipeline would use (params.yaml), auto as both: on a CPU it times both.
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(default["tasks"]) == {f"{task}_{precision}" for task in ("train", "sample")
                                     for precision in measured(params[task]["precision"])}

    rows = [ROW.match(line) for line in run.stdout.splitlines()]
    printed = {(m[1], m[2], m[3]): m for m in rows if m}
    assert len(printed) == len(default["tasks"]), run.stdout  # a row per measured task
    for key, result in default["tasks"].items():
        task, precision = key.split("_")
        row = printed[("default", task, precision)]
        assert int(row[4]) == result["batch"] == 4
        # printed: images/s to 2 decimals, MiB to 1, ratios to 2
        for metric, first, tolerance in (("images_per_s", 5, 0.006), ("peak_memory_mib", 8, 0.06)):
            numbers = result[metric]
            assert numbers["project"] > 0 and numbers["reference"] > 0
            assert math.isclose(numbers["ratio"], numbers["project"] / numbers["reference"])
            project, reference, ratio = (float(row[i]) for i in (first, first + 1, first + 2))
            assert project == pytest.approx(numbers["project"], abs=tolerance)
            assert reference == pytest.approx(numbers["reference"], abs=tolerance)
            assert ratio == pytest.approx(numbers["ratio"], abs=0.006)
            # the medians of the per-process runs, one process each with --quick
            assert [r[metric] for r in result["runs"]["project"]] == [numbers["project"]]
        assert len(result["loadavg_before"]) == 3

    pipeline = report["pipeline"]
    assert set(pipeline["stage_startup_s"]) == {"preprocess", "train_classifier", "train",
                                                 "sample", "evaluate"}
    assert all(s > 0 for s in pipeline["stage_startup_s"].values())
    assert pipeline["noop_repro_s"] > 0 and pipeline["noop_repro_where"]
