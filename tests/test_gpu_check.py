"""`benchmarks/gpu_check.sh`, the first GPU session's one call, run here in its CPU mode (toy
sizes, the CUDA tests skipped): every step runs and the one JSON file holds every figure the
GPU run will fill in. Whether the figures mean anything is for a GPU run to say."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, cli_env


@pytest.mark.slow
def test_gpu_check_runs_every_step_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(cli_env(), GPU_CHECK_MODE="cpu", PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu" and report["ok"]
    assert report["machine"]["cuda_available"] is False or "gpus" in report["machine"]
    tests = report["cuda_tests"]
    assert tests["tests"] >= 5 and tests["failures"] == tests["errors"] == 0
    figures = report["speed"]["cnn3"]["figures"]
    for key in ("ours_train_images_per_second", "seed_style_train_images_per_second"):
        assert figures[key] > 0
    assert figures["ratio_to_seed_style"]["train"] > 0
    study = report["study"]["figures"]
    assert study["finished"] == 2 and study["trials_per_hour"] > 0
    assert study["precision"] and "None" not in study["precision"]
    assert "written to" in done.stdout and os.path.getsize(out) > 0


def test_failed_cuda_tests_are_named_in_the_report(tmp_path, monkeypatch):
    """A GPU run's failing tests come back by name and message, read from pytest's JUnit XML."""
    from benchmarks import gpu_check

    (tmp_path / "cuda-tests.xml").write_text(
        '<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="3">'
        '<testcase name="a"/><testcase name="b"><failure message="boom">trace</failure>'
        '</testcase><testcase name="c"><skipped message="no GPU"/></testcase>'
        "</testsuite></testsuites>")
    monkeypatch.setattr(gpu_check, "_run", lambda *args, **kwargs: {"exit": 1})
    step = gpu_check.cuda_tests(tmp_path, seconds=5)
    assert (step["passed"], step["failures"], step["skipped"]) == (1, 1, 1)
    assert step["failed_tests"] == ["b: boom"]
