"""Many processes started at the same moment on one fresh PostgreSQL study (issue 16): every one
exits 0, and when a storage does fail the paragraph names the real error."""

from __future__ import annotations

import sqlite3
import threading
import time

import optuna
import psycopg
import pytest
import sqlalchemy
from helpers import SMALL, check_study, finish, start_cli
from optuna.storages._rdb import models

from search.config.settings import load_config
from search.config.urls import StoreUrl
from search.runner.progress import storage_failure
from search.storage.backends import DatabaseLock
from search.storage.checks import open_if_exists
from search.storage.reading import open_existing

ARGS = [*SMALL, "pruner=none", "sampler=random", "tracking_uri=none", "epochs=1"]
PROCESSES, ROUNDS = 6, 1  # as many as 2 CI cores start in ~30 s; the race itself is made
# deterministic by test_a_check_waits_for_the_process_that_creates_the_tables


def test_the_storage_failure_paragraph_names_the_error_class_and_message():
    config = load_config(["study=cnn3", "storage=postgresql://search:pw-42@db/optuna"])
    try:
        raise sqlalchemy.exc.OperationalError(
            "SELECT 1", {}, Exception("connection to postgresql://search:pw-42@db/optuna failed:"
                                      " FATAL:  sorry, too many clients already\nline two"))
    except sqlalchemy.exc.OperationalError as error:
        wrapped = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
        wrapped.__cause__ = error
    text = storage_failure(config, wrapped)
    assert ("failed while the study ran (sqlalchemy.exc.OperationalError: (builtins.Exception) "
            "connection to postgresql://search:***@db/optuna failed: FATAL:  sorry, too many "
            "clients already)") in text
    assert "pw-42" not in text and "line two" not in text and "\n" not in text
    assert "(sqlite3.OperationalError: disk I/O error)" in storage_failure(
        config, sqlite3.OperationalError("disk I/O error"))


def waiting_for_an_advisory_lock(url: str, thread: threading.Thread, seconds: float = 30) -> bool:
    """Whether some session of the server at `url` waits for an advisory lock, polled until one
    does, `thread` ends, or `seconds` pass."""
    deadline = time.monotonic() + seconds
    with psycopg.connect(url, autocommit=True) as watcher:
        while time.monotonic() < deadline and thread.is_alive():
            waiting = watcher.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                      "AND NOT granted").fetchone()[0]
            if waiting:
                return True
            time.sleep(0.02)  # the poll interval
    return False


def _check_before_a_run(url: str) -> optuna.storages.RDBStorage:
    return open_if_exists(StoreUrl(url))


def _open_for_a_report(url: str) -> optuna.storages.RDBStorage:
    return open_existing(StoreUrl(url))[0]


@pytest.mark.slow
@pytest.mark.parametrize("reader", [_check_before_a_run, _open_for_a_report])
def test_a_check_waits_for_the_process_that_creates_the_tables(postgres, tmp_path, reader):
    """The race behind issue 16, made deterministic: one process has created Optuna's tables and
    is stamping alembic_version (its transaction open) when another opens the storage, to check
    it before a run or to read it for a report, sync, the API or the dashboard (the one read
    path, `open_existing`). Unlocked, the second stamp collided with the first (an IntegrityError
    in one of them: a run exited 1, "storage failed while the study ran"; a report started while
    the first worker created the tables failed); now both wait for the lock."""
    head = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/head.db").get_current_version()
    url = postgres.url(postgres.create_database(f"optuna_stamp_race_{reader.__name__[1:6]}"))
    models.BaseModel.metadata.create_all(sqlalchemy.create_engine(url))
    creating = DatabaseLock(StoreUrl(url), "optuna-schema")  # held as make_storage holds it
    with psycopg.connect(url) as creator:
        creator.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        creator.execute("INSERT INTO alembic_version VALUES (%s)", [head])  # not committed yet
        seen: dict[str, object] = {}

        def check() -> None:
            try:
                seen["storage"] = reader(url)
            except Exception as error:  # noqa: BLE001 - the test reports it
                seen["error"] = error

        checker = threading.Thread(target=check)
        checker.start()
        # Commit only once the check waits for the lock (an advisory lock not granted), so that
        # the check runs exactly inside the window the race needs.
        assert waiting_for_an_advisory_lock(url, checker), "the check never waited for the lock"
        creator.commit()
    creating.release()
    checker.join(30)
    assert "error" not in seen, seen
    assert seen["storage"].get_current_version() == head


@pytest.mark.slow
def test_many_processes_started_at_once_on_a_fresh_postgresql_study_all_succeed(postgres, tmp_path):
    for round_ in range(ROUNDS):
        storage = postgres.url(postgres.create_database(f"optuna_stress_{round_}"))
        n_trials = PROCESSES  # about one tiny trial each: the start is what is tested
        processes = [start_cli("search.run", *ARGS, f"n_trials={n_trials}", f"storage={storage}",
                               cwd=tmp_path) for _ in range(PROCESSES)]
        results = [finish(p, timeout=200) for p in processes]
        failed = [r.stderr[-2000:] for r in results if r.returncode != 0]
        assert not failed, f"round {round_}: {len(failed)} of {PROCESSES} failed:\n" + "\n".join(failed)
        check_study(storage, n_trials)
        assert sum("Created study" in r.stdout for r in results) == 1
