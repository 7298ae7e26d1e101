"""The first GPU session's work in one call: `bash benchmarks/gpu_check.sh [OUT.json]` (at most
8 minutes) runs

1. the CUDA-marked tests (`tests/test_cuda.py`, `pytest -m cuda`), which skip without a GPU;
2. `benchmarks/speed.py device=cuda` for cnn3 and for resnet20 with `throughput=[1,2,4]`: images/s
   of this package's trainer and of the seed-style pipeline (PIL transforms, DataLoader workers,
   fp32) and their ratio, and finished trials/hour with 1, 2 and 4 trial processes;
3. a short real study with `workers=2` (cnn3 on `dataset=fake`, SQLite and MLflow in a
   temporary folder): its wall time, trials/hour, states and each trial's recorded precision;

and writes every figure to one JSON file (default `benchmarks/results/gpu_check.json`). A step
that fails or runs out of time is recorded as such (its exit status and the end of its output)
and the others still run, so one call always brings back what could be measured.

`mode=cpu` runs the same steps on the CPU at toy sizes (the CUDA tests skip, speed.py runs for
cnn3 only): that is how CI checks, on every commit, that the script works
(`tests/test_gpu_check.py`). Its figures mean nothing.

Usage: `python benchmarks/gpu_check.py [mode=cuda|cpu] [out=PATH] [budget=SECONDS]`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = ("cuda", "cpu")
# Sizes per mode: a GPU run fits in 8 minutes on an H100-class card (speed.py's defaults take
# longer: 45,000 images per epoch and 12-trial throughput studies); the CPU run is a smoke test.
SPEED_ARGS = {
    "cuda": ["device=cuda", "throughput=[1,2,4]", "train_images=20000", "epochs=3",
             "study_trials=4", "throughput_trials=8"],
    "cpu": ["device=cpu", "throughput=[]", "batch_size=32", "train_images=96", "val_images=40",
            "epochs=2", "workers=0", "study_trials=0"],
}
STUDY_ARGS = {
    "cuda": ["study=cnn3", "dataset=fake", "epochs=3", "n_trials=8", "workers=2", "device=cuda"],
    "cpu": ["study=cnn3", "dataset=fake", "epochs=1", "n_trials=2", "workers=2", "device=cpu",
            "tracking_uri=none", "space.width_1.choices=[8]", "space.width_2.choices=[8]",
            "space.width_3.choices=[8]", "space.hidden_1.choices=[16]",
            "space.batch_size.choices=[128]", "baselines=[]"],
}


def _tail(text: str, limit: int = 3000) -> str:
    return text[-limit:] if text else ""


def _run(command: list[str], *, seconds: float, cwd: Path = ROOT,
         env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs one step; its exit status, wall time and output tail, never an exception."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=max(1.0, seconds))
        status, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        status = "timeout"
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
        err = expired.stderr.decode() if isinstance(expired.stderr, bytes) else expired.stderr or ""
    return {"command": " ".join(command), "exit": status,
            "seconds": round(time.perf_counter() - started, 1),
            "stdout_tail": _tail(out), "stderr_tail": _tail(err)}


def _env() -> dict[str, str]:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def machine() -> dict[str, Any]:
    """The card, its compute capability and the precision trials get on it."""
    import torch

    from search.training.loop import Speed

    info: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                            "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info |= {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                 "capability": list(torch.cuda.get_device_capability(0)),
                 "precision": Speed.for_device("cuda").precision,
                 "cuda": torch.version.cuda}
    else:
        info["precision_cpu"] = Speed.for_device("cpu").precision
    return info


def cuda_tests(folder: Path, seconds: float) -> dict[str, Any]:
    """`pytest -m cuda tests/test_cuda.py`, with the counts read from its JUnit XML."""
    junit = folder / "cuda-tests.xml"
    step = _run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-m", "cuda", "-p",
                 "no:cacheprovider", f"--junitxml={junit}", "tests/test_cuda.py"],
                seconds=seconds, env=_env())
    if junit.is_file():
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        failed = []
        for case in suite.iter("testcase"):
            # (An Element with no children is falsy: compare with None, never `or`.)
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if problem is not None:
                failed.append(f"{case.get('name')}: {problem.get('message', '')[:300]}")
        step |= counts | {"failed_tests": failed}
    return step


def speed(model: str, mode: str, folder: Path, seconds: float) -> dict[str, Any]:
    """`benchmarks/speed.py` for one model; the figures the docs quote, from its JSON."""
    out = folder / f"speed-{model}.json"
    step = _run([sys.executable, "benchmarks/speed.py", f"model={model}", *SPEED_ARGS[mode],
                 f"out={out}"], seconds=seconds, env=_env())
    if out.is_file():
        report = json.loads(out.read_text())
        step["figures"] = {
            "gpu": report["machine"].get("gpu"), "batch_size": report["batch_size"],
            "speed": report["speed"],
            "ours_train_images_per_second": report["ours"]["train_images_per_second"],
            "ours_val_images_per_second": report["ours"]["val_images_per_second"],
            "seed_style_train_images_per_second": report["baseline"]["train_images_per_second"],
            "seed_style_val_images_per_second": report["baseline"]["val_images_per_second"],
            "ratio_to_seed_style": report["ratio"],
            "study": report.get("study"), "throughput": report.get("throughput", []),
        }
    return step


def study(mode: str, folder: Path, seconds: float) -> dict[str, Any]:
    """A short real study with workers=2: wall time, trials/hour, what each trial recorded."""
    import optuna

    storage = f"sqlite:///{folder}/study.db"
    words = [*STUDY_ARGS[mode], f"storage={storage}", "study_name=gpu-check"]
    if "tracking_uri=none" not in words:
        words.append(f"tracking_uri=sqlite:///{folder}/mlflow.db")
    step = _run([sys.executable, "-m", "search.run", *words], seconds=seconds, cwd=folder,
                env=_env())
    try:
        trials = optuna.load_study(study_name="gpu-check", storage=storage).get_trials(deepcopy=False)
    except Exception as error:  # noqa: BLE001 - the study may never have been created
        step["error"] = f"{type(error).__name__}: {error}"
        return step
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    step["figures"] = {
        "trials": len(trials), "finished": len(finished),
        "states": sorted(t.state.name for t in trials),
        "trials_per_hour": len(finished) / step["seconds"] * 3600 if step["seconds"] else None,
        "precision": sorted({str(t.user_attrs.get("precision")) for t in trials}),
        "images_per_second": [t.user_attrs.get("images_per_second") for t in finished],
        "fail_reasons": [t.user_attrs.get("fail_reason") for t in trials if t.state.name == "FAIL"],
    }
    return step


def check(mode: str, out: Path, budget: float) -> dict[str, Any]:
    """Every step in turn, each given what is left of `budget` seconds; returns the report."""
    started = time.perf_counter()

    def left(share: float) -> float:  # this step's time: its share of what is left
        return max(5.0, (budget - (time.perf_counter() - started)) * share)

    report: dict[str, Any] = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "mode": mode, "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="search-gpu-check-") as name:
        folder = Path(name)
        report["cuda_tests"] = cuda_tests(folder, left(0.25))
        report["speed"] = {"cnn3": speed("cnn3", mode, folder, left(0.4))}
        if mode == "cuda":  # the CPU smoke run checks the step once, with the smaller model
            report["speed"]["resnet20"] = speed("resnet20", mode, folder, left(0.65))
        report["study"] = study(mode, folder, left(0.95))
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = (report["cuda_tests"]["exit"] in (0, 5)  # 5: no test collected/run
                    and all(s["exit"] == 0 for s in report["speed"].values())
                    and report["study"]["exit"] == 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def main(argv: list[str]) -> int:
    settings = {"mode": "cuda", "out": "benchmarks/results/gpu_check.json", "budget": "460"}
    for word in argv:
        key, sep, value = word.partition("=")
        if not sep or key not in settings:
            print(f"usage: python benchmarks/gpu_check.py [mode=cuda|cpu] [out=PATH] "
                  f"[budget=SECONDS]; not understood: {word!r}", file=sys.stderr)
            return 2
        settings[key] = value
    if settings["mode"] not in MODES:
        print(f"mode={settings['mode']!r}: allowed: {', '.join(MODES)}.", file=sys.stderr)
        return 2
    out = Path(settings["out"])
    report = check(settings["mode"], out if out.is_absolute() else ROOT / out,
                   float(settings["budget"]))
    tests = report["cuda_tests"]
    print(f"gpu_check ({settings['mode']}): CUDA tests {tests.get('passed', '?')} passed, "
          f"{tests.get('failures', '?')} failed, {tests.get('skipped', '?')} skipped; "
          + "; ".join(f"{m} speed exit {s['exit']}" for m, s in report["speed"].items())
          + f"; study exit {report['study']['exit']}; {report['total_seconds']} s; written to {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
