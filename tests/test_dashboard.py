"""optuna-dashboard (search.dashboard): artifacts next to the storage, the study note, and the
dashboard's own HTTP API serving them, driven in process through `optuna_dashboard.wsgi`."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import optuna_dashboard
import pytest
import yaml
from helpers import FAKE
from optuna.trial import TrialState
from werkzeug.test import Client

from search import dashboard
from search.config.command_line import main_guard
from search.config.settings import load_config
from search.config.urls import StoreUrl
from search.storage.backends import artifact_store
from search.tracking.dashboard_artifacts import DashboardArtifacts, study_note
from search.training.results import EpochMetrics

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

SPACE = [*FAKE, "epochs=3", "space.width_1.choices=[8]", "space.optimizer.choices=[sgd,adam]"]


def _history(epochs: int) -> list[EpochMetrics]:
    return [EpochMetrics(epoch=e, train_loss=2.0 / e, train_accuracy=0.3 * e, val_loss=2.2 / e,
                         val_accuracy=0.25 * e, lr=0.1, epoch_seconds=0.5,
                         images_per_second=1000.0) for e in range(1, epochs + 1)]


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """A study of three trials (complete, pruned, failed before its first epoch) whose
    artifacts and note were written by the real observer, as during `search.run`.
    Shared by the tests of this module, which only read it."""
    storage = f"sqlite:///{tmp_path_factory.mktemp('dashboard')}/optuna.db"
    config = load_config([*SPACE, f"storage={storage}", "tracking_uri=none"])
    study = optuna.create_study(storage=storage, study_name=config.study_name, direction="maximize")
    observer = DashboardArtifacts(config)
    outcomes = [(TrialState.COMPLETE, _history(3), {}),
                (TrialState.PRUNED, _history(1), {"pruned_at_epoch": 1}),
                (TrialState.FAIL, [], {"fail_reason": "out of memory: CUDA"})]
    for state, history, attrs in outcomes:
        trial = study.ask()
        params = {"optimizer": trial.suggest_categorical("optimizer", ["sgd", "adam"]),
                  "batch_norm": True}
        observer.trial_started(trial, params)
        observer.trial_finished(trial, state, params, {"epochs_run": len(history), **attrs},
                                history)
        for metrics in history:
            trial.report(metrics.val_accuracy, metrics.epoch)
        study.tell(trial, history[-1].val_accuracy if state == TrialState.COMPLETE else None,
                   state=state)
    observer.close()  # the curves are drawn by then
    return config, study


def test_artifacts_live_next_to_the_storage(tmp_path):
    assert StoreUrl("sqlite:///mlruns/optuna.db").artifact_dir == Path("mlruns/optuna-artifacts")
    assert StoreUrl(f"sqlite:///{tmp_path}/a/o.db").artifact_dir == tmp_path / "a" / "optuna-artifacts"
    # A driver in the URL names the same file (this once sent artifacts to mlruns/ instead).
    assert (StoreUrl(f"sqlite+pysqlite:///{tmp_path}/a/o.db").artifact_dir
            == tmp_path / "a" / "optuna-artifacts")
    assert StoreUrl("postgresql://u@db/optuna").artifact_dir == Path("mlruns/optuna-artifacts")


def test_dashboard_serves_study_trials_note_and_artifacts(small_study):
    config, study = small_study
    app = optuna_dashboard.wsgi(config.storage.raw, artifact_store=artifact_store(config.storage))
    client = Client(app)

    summaries = client.get("/api/studies").get_json()["study_summaries"]
    assert [s["study_name"] for s in summaries] == [config.study_name]
    study_id = summaries[0]["study_id"]

    detail = client.get(f"/api/studies/{study_id}").get_json()
    assert [t["state"] for t in detail["trials"]] == ["Complete", "Pruned", "Fail"]
    note = detail["note"]["body"]
    assert note == study_note(config)
    assert "**cnn3** on **fake**" in note and "mlflow" in note.lower()
    for spec in config.space:  # the whole space, as ParamSpec.describe() writes it
        assert f"| `{spec.name}` | {spec.describe()} |" in note

    for trial in detail["trials"]:
        number, trial_id = trial["number"], trial["trial_id"]
        by_name = {a["filename"]: a for a in trial["artifacts"]}
        expected = {f"trial-{number:04d}-config.yaml"}
        if trial["state"] != "Fail":  # a trial with no epoch has no curve to draw
            expected.add(f"trial-{number:04d}-learning-curve.png")
        assert set(by_name) == expected
        served = client.get(f"/artifacts/{study_id}/{trial_id}/"
                            f"{by_name[f'trial-{number:04d}-config.yaml']['artifact_id']}")
        assert served.status_code == 200
        saved = yaml.safe_load(served.get_data(as_text=True))
        assert saved["trial"] == number and saved["model"] == "cnn3"
        assert saved["params"]["optimizer"] == study.trials[number].params["optimizer"]
        assert saved["params"]["batch_norm"] is True  # fixed values are in the config too
        if f"trial-{number:04d}-learning-curve.png" in by_name:
            png = client.get(f"/artifacts/{study_id}/{trial_id}/"
                             f"{by_name[f'trial-{number:04d}-learning-curve.png']['artifact_id']}")
            assert png.status_code == 200 and png.headers["Content-Type"] == "image/png"
            assert png.get_data().startswith(b"\x89PNG")
    assert saved["results"]["fail_reason"] == "out of memory: CUDA"


def test_a_note_edited_in_the_dashboard_is_kept(tmp_path):
    config = load_config([*SPACE, f"storage=sqlite:///{tmp_path}/o.db", "tracking_uri=none"])
    study = optuna.create_study()
    DashboardArtifacts(config).trial_started(study.ask(), {})
    assert optuna_dashboard.get_note(study) == study_note(config)
    optuna_dashboard.save_note(study, "my own findings")
    DashboardArtifacts(config).trial_started(study.ask(), {})  # a resumed run
    assert optuna_dashboard.get_note(study) == "my own findings"


def test_command_starts_the_dashboard_with_the_artifact_store(small_study, monkeypatch, capsys):
    config, study = small_study
    started = {}
    monkeypatch.setattr(optuna_dashboard, "run_server",
                        lambda storage, **kwargs: started.update(storage=storage, **kwargs))
    code = main_guard(dashboard.main, ["study=cnn3", f"storage={config.storage}", "port=8123",
                                       "host=0.0.0.0"])
    assert code == 0, capsys.readouterr().err
    assert (started["host"], started["port"]) == ("0.0.0.0", 8123)
    assert Path(started["artifact_store"]._base_path) == config.storage.artifact_dir
    assert started["storage"].get_all_studies()[0].study_name == "cnn3"
    assert f"http://0.0.0.0:8123/dashboard/studies/{study._study_id}" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["study_name=nope"], "no study named 'nope' in"),
    (["port=http"], "port='http': expected a port number from 1 to 65535"),
])
def test_command_errors_are_one_clear_line(small_study, capsys, args, message):
    config, _ = small_study
    assert main_guard(dashboard.main, ["study=cnn3", f"storage={config.storage}", *args]) == 2
    assert message in capsys.readouterr().err


def test_command_refuses_a_missing_storage_without_creating_it(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/missing.db"
    assert main_guard(dashboard.main, ["study=cnn3", f"storage={storage}"]) == 2
    assert "no such database file" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()


def test_help_lists_the_server_keys(capsys):
    assert main_guard(dashboard.main, ["--help"]) == 0
    out = capsys.readouterr().out
    assert "python -m search.dashboard" in out and "port" in out and "host" in out
