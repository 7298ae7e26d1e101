"""The link a run prints opens the MLflow UI on the study's runs, checked in a real browser.

MLflow 3.17's UI keeps a GenAI / model-training mode per browser (GenAI in a fresh one) and opens
an experiment on the GenAI overview whatever its tags say; `?workflowType=machine_learning` in
the link switches to model training. The summary prints the link (and nothing about MLflow when
tracking is off); end to end, a tiny study logs to a SQLite store, a real `mlflow ui` serves it,
and headless Chromium (a fresh profile each time, so no remembered mode) renders the printed
link, the same page without the parameter and the bare experiment.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
from helpers import TINY, cli_env, free_port, overriding, run_cli, wait_for_health

from search.config.settings import load_config
from search.runner.progress import print_summary

CHROMIUM = shutil.which("chromium")

PRINTED = re.compile(r"open (http://127\.0\.0\.1:5000)(/#/experiments/(\d+)/runs"
                     r"\?workflowType=machine_learning)\s")
# Virtual time stands still while requests are pending, so the budget only has to cover the
# app's timers: 200 ms rendered the runs here, 1 ms did not; virtual time skips ahead when idle,
# so a generous budget costs no wall time (about 3 s a page). (A budget of 0 never dumps.)
VIRTUAL_TIME_MS = 10_000


def render(url: str, folder: Path, name: str) -> str:
    """The page's DOM once its scripts have run, also saved as `folder/name.html` beside a
    screenshot, `folder/name.png`."""
    with tempfile.TemporaryDirectory(dir=folder) as profile:
        process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--window-size=1400,900",
             f"--virtual-time-budget={VIRTUAL_TIME_MS}", f"--screenshot={folder / name}.png",
             "--dump-dom", url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            dom, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the browser and its renderers
            process.communicate()
            pytest.fail(f"chromium did not render {url} within 60 s")
    assert process.returncode == 0 and "</html>" in dom, f"chromium failed on {url}:\n{err}"
    (folder / f"{name}.html").write_text(dom)
    return dom


def heading(dom: str) -> str:
    """The page's title (`Runs`, `Training runs`, `Overview`)."""
    found = re.search(r"<h2\b[^>]*>([^<]*)</h2>", dom)
    return found.group(1) if found else ""


def texts(dom: str) -> set[str]:
    """Every text between two tags: the labels of links, menus and table cells."""
    return {text.strip() for text in re.findall(r">([^<>]+)<", dom)}


def text_of(dom: str) -> str:
    """The DOM without its tags (`<strong>3</strong> matching runs` -> `3 matching runs`)."""
    return re.sub(r"<[^>]*>", "", dom)


@pytest.mark.parametrize(("tracking_uri", "experiment_id", "lines"), [
    ("none", None, []),
    ("sqlite:///mlruns/mlflow.db", "1", [
        "  mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db   # serves the MLflow UI; then:",
        "  open http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
        "   # MLflow: compare runs"]),
    ("http://search:secret@mlflow:5000/", "7", [
        "  open http://search:***@mlflow:5000/#/experiments/7/runs?workflowType=machine_learning"
        "   # MLflow: compare runs"]),
])
def test_the_summary_links_the_runs_only_when_tracking_is_on(tracking_uri, experiment_id, lines,
                                                             capsys):
    config = load_config(overriding(TINY, f"tracking_uri={tracking_uri}"))
    study = optuna.create_study(direction="maximize")
    study.tell(study.ask(), 0.5)
    print_summary(study, config, experiment_id)
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if "mlflow" in line.lower()] == lines


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_printed_link_opens_the_runs_in_model_training_mode(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli("search.run", *overriding(TINY, f"tracking_uri={store}"),
                     f"storage=sqlite:///{tmp_path / 'optuna.db'}", "epochs=1", "n_trials=2",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"mlflow ui --backend-store-uri {store}" in result.stdout
    printed = PRINTED.search(result.stdout)
    assert printed, result.stdout
    default_ui, page, experiment_id = printed.groups()

    port = free_port()
    log = tmp_path / "ui.log"
    with open(log, "w") as handle:
        ui = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store,
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=tmp_path, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(cli_env(), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, ui, log)
        # The printed link on this test's port instead of mlflow ui's default 5000, the same page
        # without the parameter, and the bare experiment; three browsers at once.
        pages = {"runs": url + page, "runs-without-parameter": url + page.split("?")[0],
                 "experiment": f"{url}/#/experiments/{experiment_id}"}
        with ThreadPoolExecutor(len(pages)) as pool:
            runs, plain, experiment = pool.map(
                lambda name: render(pages[name], tmp_path, name), pages)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # mlflow ui and its uvicorn worker
        try:
            ui.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()

    shots = f"(screenshots in {tmp_path})"
    # The link: the study's runs (its parent run and the run count) in model-training mode,
    # whose menu has Runs and Models but none of GenAI's Overview, Sessions or Judges.
    assert heading(runs) == "Runs", shots
    assert "study-cnn3" in texts(runs) and "3 matching runs" in text_of(runs), shots  # + 2 trials
    assert {"Runs", "Models"} <= texts(runs), shots
    assert not {"Overview", "Sessions", "Judges"} & texts(runs), shots
    # The same page without the parameter still lists the runs, but in GenAI mode ("Training
    # runs", with GenAI's menu); the bare experiment opens GenAI's overview, with no runs.
    assert heading(plain) == "Training runs", shots
    assert {"Overview", "Sessions", "Judges"} <= texts(plain), shots
    assert heading(experiment) == "Overview" and "study-cnn3" not in texts(experiment), shots
    assert default_ui == "http://127.0.0.1:5000"
