"""A read creates nothing (issue 23): the commands and API functions that only read a study or a
model (`search.predict` and `search.load_model`, `search.report` without a model to retrain,
`search.train` of a trial that is not there, `search.dashboard`, `search.sync`'s and
`search.open_study`'s reading) leave no database, folder or MLflow experiment behind. A store
that is not there is one line naming the key that points at it, exit 2 (`SearchError` in the API).
Each test lists the files and folders of its temporary folder before and after."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

import optuna
import optuna_dashboard
import pytest
from helpers import FAKE, cli_env, finish, free_port, start_cli
from mlflow import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

import search
from search import api, dashboard
from search.config.command_line import main_guard
from search.config.settings import load_config
from search.report import main as report_main
from search.storage.studies import open_study
from search.sync import main as sync_main
from search.train import main as train_main

# What SQLite itself keeps beside an open database while a connection lives: not ours to count.
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
LR = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}


def tree(root: Path) -> set[str]:
    """Every file and folder under `root`, as paths relative to it."""
    found = set()
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            if not name.endswith(SQLITE_SIDE_FILES):
                found.add(os.path.relpath(os.path.join(folder, name), root))
    return found


def tables(database: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
        return sorted(row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, no store named by the environment: the defaults
    (`mlruns/optuna.db`, `mlruns/mlflow.db`) would land here."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("SEARCH_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return cwd


def make_study(folder: Path, states: list[TrialState]) -> str:
    """A cnn3 study, created as search.run creates it (its config stored), in `folder`/optuna.db,
    whose MLflow store `folder`/mlflow.db was never made; one trial per state, told without
    training. Returns the storage URL."""
    folder.mkdir(exist_ok=True)
    storage = f"sqlite:///{folder / 'optuna.db'}"
    config = load_config([*FAKE, f"storage={storage}", f"tracking_uri=sqlite:///{folder / 'mlflow.db'}",
                          "baselines=[]", "epochs=2"])
    study, _, _ = open_study(config)
    for state in states:
        trial = study.ask(LR)
        if state != TrialState.FAIL:
            trial.report(0.5, 1)
        study.tell(trial, 0.5 if state == TrialState.COMPLETE else None, state=state)
    return storage


# ---------------------------------------------------------------- a model from a tracking store

@pytest.mark.slow
def test_predict_with_a_typo_in_tracking_uri_creates_no_store(tmp_path: Path) -> None:
    env = {k: v for k, v in cli_env().items() if k != "MLFLOW_TRACKING_URI"}
    done = finish(start_cli("search.predict", "model=models:/cnn3-best/1", "images=pictures",
                            "tracking_uri=sqlite:///typo.db", cwd=tmp_path, env=env))
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith("error: tracking_uri=sqlite:///typo.db: no such MLflow store "), done.stderr
    assert "set tracking_uri= to the store search.run logged to" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # no traceback, no migrations
    assert tree(tmp_path) == set()


def test_load_model_creates_no_store_and_takes_over_no_database(workdir: Path, monkeypatch) -> None:
    before = tree(workdir.parent)
    with pytest.raises(search.SearchError, match=r"^tracking_uri=sqlite:///mlruns/mlflow.db \(the "
                       r"default\): no such MLflow store .*set tracking_uri= to the store"):
        search.load_model("models:/cnn3-best/1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///typo.db")
    with pytest.raises(search.SearchError, match="^tracking_uri=sqlite:///typo.db: no such MLflow store"):
        # search.predict loads it the same way (named through search.api: once a test module
        # has imported the command `search.predict`, that module shadows the function).
        api.predict("models:/cnn3-best/1", workdir, top_k=1)
    for uri, message in ((f"http://127.0.0.1:{free_port()}", "cannot reach the MLflow tracking store"),
                         ("mlruns", "a directory is MLflow's old file store")):
        with pytest.raises(search.SearchError, match=f"^tracking_uri={uri}: {message}.*[Ss]et "
                           "tracking_uri= to the store search.run logged to"):
            search.load_model("models:/cnn3-best/1", tracking_uri=uri)
    assert tree(workdir.parent) == before

    # Files that exist but are not MLflow stores are refused, not migrated into one.
    optuna.create_study(study_name="other", storage=f"sqlite:///{workdir / 'optuna.db'}")
    (workdir / "empty.db").touch()
    optuna_tables, before = tables(workdir / "optuna.db"), tree(workdir.parent)
    for name, message in (("optuna.db", "holds tables that are not MLflow's"),
                          ("empty.db", "holds no tables")):
        with pytest.raises(search.SearchError, match=f"^tracking_uri=sqlite:///{workdir / name}: "
                           f"not an MLflow store \\(the database {message}"):
            search.load_model("models:/cnn3-best/1", tracking_uri=f"sqlite:///{workdir / name}")
    assert tables(workdir / "optuna.db") == optuna_tables
    assert (workdir / "empty.db").stat().st_size == 0
    assert tree(workdir.parent) == before

    # A real MLflow store without that model: the model is not there, and nothing is made.
    MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").search_experiments()
    before = tree(workdir.parent)
    with pytest.raises(search.SearchError, match="^model=models:/cnn3-best/1: cannot be loaded from "
                       f"tracking_uri=sqlite:///{workdir / 'mlflow.db'} "):
        search.load_model("models:/cnn3-best/1", tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    assert tree(workdir.parent) == before


# ---------------------------------------------------------------- a study from a storage

def test_a_missing_storage_is_refused_by_every_reader_and_nothing_is_made(workdir: Path,
                                                                          capsys) -> None:
    message = ("storage=sqlite:///mlruns/optuna.db (the default storage): no such database file "
               "'mlruns/optuna.db'; pass the storage= that search.run used.")
    with pytest.raises(search.SearchError) as raised:
        search.open_study("cnn3")
    assert str(raised.value) == message
    for main in (report_main, sync_main, dashboard.main, train_main):
        assert main_guard(main, ["study=cnn3", "trial=0"] if main is train_main else ["study=cnn3"]) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert tree(workdir.parent) == {"cwd"}


def test_the_dashboard_creates_no_artifact_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    storage = make_study(tmp_path / "store", [TrialState.COMPLETE])
    before = tree(tmp_path)
    started = {}
    monkeypatch.setattr(optuna_dashboard, "run_server",
                        lambda storage, **kwargs: started.update(storage=storage, **kwargs))
    assert main_guard(dashboard.main, ["study=cnn3", f"storage={storage}"]) == 0
    assert started["artifact_store"] is None
    assert f"no artifacts: no folder: {tmp_path / 'store' / 'optuna-artifacts'}" in capsys.readouterr().out
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- nothing to retrain

def test_a_report_with_nothing_to_retrain_creates_no_mlflow_store(tmp_path: Path) -> None:
    storage = make_study(tmp_path / "store", [TrialState.PRUNED, TrialState.FAIL])
    before = tree(tmp_path)
    out = tmp_path / "out"
    assert main_guard(report_main, ["study=cnn3", f"storage={storage}", "retrain=top1",
                                    f"out={out}"]) == 0
    assert "Not run: no trial has completed yet." in (out / "cnn3" / "report.md").read_text()
    added = tree(tmp_path) - before
    assert {"out", "out/cnn3", "out/cnn3/report.md", "out/cnn3/trials.csv"} <= added
    assert all(path.startswith("out/cnn3/") or path in ("out", "out/cnn3") for path in added), added
    assert not (out / "cnn3" / "models").exists() and not (tmp_path / "store" / "mlflow.db").exists()


def test_a_report_or_train_that_refuses_leaves_no_folder_and_no_mlflow_store(
        tmp_path: Path, workdir: Path, capsys) -> None:
    storage = make_study(tmp_path / "store", [TrialState.FAIL])
    before = tree(tmp_path)
    assert main_guard(report_main, ["study=cnn3", f"storage={storage}", "retrain=top1"]) == 2
    assert "has no finished trial yet (1 fail)" in capsys.readouterr().err
    assert main_guard(train_main, ["study=cnn3", f"storage={storage}", "trial=7", "full=true"]) == 2
    assert "trial=7: study 'cnn3' has trials 0..0" in capsys.readouterr().err
    assert tree(tmp_path) == before  # no reports/, reports/cnn3/models/ or store/mlflow.db
