"""The search ends in a model: `search.report retrain=top1` saves it, logs it to MLflow and
registers it as `<study>-best`; loaded in a fresh process (`search.load_model` and plain
`mlflow.pytorch.load_model`) it gets exactly the recorded test accuracy; its files are in MLflow,
under its run and in the registry, and the MLflow UI shows the registered version (a real
`mlflow server`, headless Chromium)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys

import pytest
from helpers import SMALL, cli_env, overriding, run_cli
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

# Loads the model twice in a process of its own and scores it on the fake test split.
FRESH_PROCESS = """
import json, sys
import mlflow, search
from search.training.classifier import score
from search.training.images import load_split

uri, tracking = sys.argv[1], sys.argv[2]
test = load_split("fake", "data", train=False)
model = search.load_model(uri, tracking_uri=tracking)
mlflow.set_tracking_uri(tracking)
exported = mlflow.pytorch.load_model(uri)  # the torch.export graph: no search classes needed
hits = int((exported(test.images).argmax(1) == test.labels).sum())
# No device fixed in the graph: it follows its input (the "meta" device stands in for a GPU).
fixed = [str(n.target) for n in exported.graph.nodes
         if "device(" in repr((n.args, n.kwargs))]
on_meta = list(exported.to("meta")(test.images[:3].to("meta")).shape)
print(json.dumps({"search": score(model, test)[1], "mlflow": hits / len(test),
                  "type": type(exported).__module__, "card": model.card.as_dict(),
                  "fixed_devices": fixed, "on_meta": on_meta}))
"""


def test_a_registered_model_reproduces_its_test_accuracy_in_a_fresh_process(tmp_path, mlflow_server):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    where = [f"storage={storage}", f"tracking_uri={mlflow_server}", "study_name=bestout"]
    study = run_cli("search.run", *overriding(SMALL, "epochs=1", "n_trials=2"), *where, cwd=tmp_path)
    assert study.returncode == 0, study.stderr
    report = run_cli("search.report", "study=cnn3", *where[:2], "study_name=bestout",
                     "retrain=top1", "seeds=1", f"out={tmp_path / 'reports'}", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "Downloading artifacts" not in report.stderr + report.stdout  # no progress bar per file
    registered = re.search(r"Registered (models:/bestout-best/(\d+)) ", report.stdout)
    assert registered, report.stdout
    uri, version = registered.groups()

    # What the report recorded: final.csv, the saved file, the registered version's tags.
    [row] = [r for r in csv.DictReader((tmp_path / "reports/bestout/final.csv").open())
             if r["configuration"].startswith("rank 1")]
    saved = tmp_path / f"reports/bestout/models/trial-{int(row['trial']):04d}-seed-1.pt"
    assert saved.is_file()
    client = MlflowClient(mlflow_server)
    found = client.get_model_version("bestout-best", version)
    assert found.tags["trial_number"] == row["trial"] and found.tags["label"] == "rank 1"
    recorded = float(found.tags["test_accuracy"])
    assert f"{recorded:.4f}" == row["per seed"]

    # The model's files, under its run and in the registry.
    run = client.get_run(found.run_id)
    assert run.data.tags["search.role"] == "final_evaluation" and run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == recorded
    [logged] = [m for m in client.search_logged_models([run.info.experiment_id])
                if m.source_run_id == found.run_id]
    files = {a.path for a in client.list_logged_model_artifacts(logged.model_id)}
    assert {"MLmodel", "data", "extra_files", "requirements.txt", "input_example.json"} <= files
    assert [a.path for a in client.list_logged_model_artifacts(logged.model_id, "extra_files")] \
        == [f"extra_files/{saved.name}"]
    assert found.source == f"models:/{logged.model_id}"

    # A fresh process loads it both ways and gets the recorded accuracy, to the image.
    fresh = subprocess.run([sys.executable, "-c", FRESH_PROCESS, uri, mlflow_server],
                           capture_output=True, text=True, cwd=tmp_path, env=cli_env(), timeout=180)
    assert fresh.returncode == 0, fresh.stderr
    loaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert loaded["search"] == recorded and loaded["mlflow"] == recorded
    assert not loaded["type"].startswith("search")
    assert loaded["fixed_devices"] == [] and loaded["on_meta"] == [3, 10]  # runs on any device
    assert loaded["card"]["trial_number"] == int(row["trial"]) and loaded["card"]["dataset"] == "fake"

    # The MLflow UI shows the registered version (with its tags and source run) and, on the
    # run's page, the logged model.
    if shutil.which("chromium"):
        from test_mlflow_ui import render, text_of

        page = text_of(render(f"{mlflow_server}/#/models/bestout-best/versions/{version}",
                              tmp_path, "version"))
        assert f"Version {version}" in page and "test_accuracy" in page, page[:3000]
        assert run.info.run_name in page, page[:3000]
        page = text_of(render(f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/"
                              f"{run.info.run_id}?workflowType=machine_learning", tmp_path, "run"))
        assert "Logged models" in page and "bestout-best" in page, page[:3000]
