"""A database password never leaves the process: not printed, not in the study's attributes
(which optuna-dashboard shows), not in MLflow's tags, params or config.yaml, not in the dashboard
artifacts or the report. Checked by running the real commands against a PostgreSQL server whose
password is known, then searching every place they write for it."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import optuna_dashboard
import pytest
from helpers import SMALL, cli_env, finish, overriding, run_cli, start_cli
from mlflow import MlflowClient

from benchmarks.postgres_server import PASSWORD

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")]
ARGS = [*SMALL, "epochs=1", "n_trials=2", "pruner=none"]


def stored_text(storage: str, tracking: str, folder: Path) -> str:
    """Everything the commands stored, as one text to search."""
    study = optuna.load_study(study_name="cnn3", storage=storage)
    parts = [json.dumps(study.user_attrs, default=str), optuna_dashboard.get_note(study)]
    parts += [json.dumps([t.user_attrs, t.system_attrs], default=str) for t in study.trials]
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("cnn3")
    parts.append(json.dumps(experiment.tags))
    for run in client.search_runs([experiment.experiment_id]):
        parts.append(json.dumps([run.data.tags, run.data.params, run.info.run_name]))
        for artifact in client.list_artifacts(run.info.run_id):
            if not artifact.is_dir:
                local = client.download_artifacts(run.info.run_id, artifact.path, str(folder))
                parts.append(Path(local).read_text(errors="replace"))
    for path in folder.rglob("*"):  # dashboard artifacts, reports, everything under the cwd
        if path.is_file() and path.suffix in (".yaml", ".md", ".html", ".csv", ".json", ".txt"):
            parts.append(path.read_text(errors="replace"))
    return "\n".join(parts)


def test_the_storage_password_is_never_printed_or_stored(pg_databases, tmp_path):
    storage, tracking = pg_databases  # both URLs carry the password
    assert PASSWORD in storage and PASSWORD in tracking
    run = run_cli("search.run", *ARGS, f"storage={storage}", f"tracking_uri={tracking}",
                  cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    report = run_cli("search.report", "study=cnn3", f"storage={storage}",
                     f"tracking_uri={tracking}", "out=reports", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    refused = run_cli("search.run", *overriding(ARGS, "epochs=2"), f"storage={storage}",  # changed
                      f"tracking_uri={tracking}", cwd=tmp_path)
    assert refused.returncode == 2
    for result in (run, report, refused):
        assert PASSWORD not in result.stdout + result.stderr
    assert "search:***@127.0.0.1" in run.stdout  # shown, masked
    assert PASSWORD not in stored_text(storage, tracking, tmp_path)


def test_credentials_can_stay_off_the_command_line(postgres, tmp_path):
    """SEARCH_STORAGE and MLFLOW_TRACKING_URI give the URLs; PGPASSWORD the password."""
    database = postgres.create_database("optuna_environment")
    env = {**cli_env(), "SEARCH_STORAGE": postgres.url(database, password=False),
           "PGPASSWORD": PASSWORD, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    process = start_cli("search.run", *ARGS, cwd=tmp_path, env=env)
    result = finish(process, timeout=300)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="cnn3", storage=postgres.url(database))
    assert len(study.trials) == 2
    assert (tmp_path / "mlflow.db").is_file()
