"""Crashes at the moments between two writes of a trial's life, made real: a process is killed
with SIGKILL right there, and the same command run again must end with exactly `n_trials`
finished trials, nothing RUNNING."""

from __future__ import annotations

import signal
import subprocess
import sys

import optuna
import pytest
from conftest import TINY, cli_env, run_cli
from optuna.trial import TrialState

from search.storage.trials import TrialAttr, counts_toward_n_trials

pytestmark = pytest.mark.slow

# Opens the study as search.run does, starts a trial (a queued one, as baselines and retries are,
# or a new one) and dies at once: the earliest moment a trial is RUNNING.
KILLED_AS_THE_TRIAL_STARTS = """
import os, signal, sys
from search.config.settings import load_config
from search.storage.studies import open_study
study, _, _ = open_study(load_config(sys.argv[2:]))
if sys.argv[1] == "queued":
    study.enqueue_trial({"optimizer": "adam"})
study.ask()
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("first_trial", ["queued", "new"])
def test_a_process_killed_as_its_trial_starts_leaves_it_recoverable(tmp_path, first_trial):
    storage = f"sqlite:///{tmp_path}/o.db"
    args = [*TINY, f"storage={storage}", "epochs=1", "n_trials=3", "pruner=none"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AS_THE_TRIAL_STARTS, first_trial, *args],
                            cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (orphan,) = optuna.load_study(study_name="cnn3", storage=storage).get_trials(
        states=(TrialState.RUNNING,))
    assert orphan.user_attrs[TrialAttr.OWNER]["pid"] > 0  # recorded with the trial itself

    rerun = run_cli("search.run", *args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    trials = optuna.load_study(study_name="cnn3", storage=storage).get_trials()
    assert sum(map(counts_toward_n_trials, trials)) == 3
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    failed = trials[orphan.number]
    assert failed.state == TrialState.FAIL and "died" in failed.user_attrs[TrialAttr.FAIL_REASON]
    retry = [t for t in trials if t.user_attrs.get(TrialAttr.RETRY_OF) == orphan.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE


@pytest.mark.parametrize("key", ["storage", "tracking_uri"])
def test_a_file_that_is_not_a_database_is_refused_up_front(tmp_path, key):
    """Not reported as a storage failure mid-run (exit 1): refused before anything, exit 2."""
    notes = tmp_path / "notes.db"
    notes.write_text("my notes, not a database\n" * 100)
    urls = {"storage": f"sqlite:///{tmp_path}/o.db", "tracking_uri": f"sqlite:///{tmp_path}/m.db",
            key: f"sqlite:///{notes}"}
    result = run_cli("search.run", *[a for a in TINY if not a.startswith("tracking_uri=")],
                     "n_trials=1", *(f"{k}={v}" for k, v in urls.items()), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {key}=sqlite:///{notes}: {notes} exists but is not "
                                    "a SQLite database"), result.stderr
    assert notes.read_text() == "my notes, not a database\n" * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]  # no .lock, no new file


def test_a_database_of_another_program_is_not_taken_over(tmp_path):
    import sqlite3

    other = tmp_path / "app.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    result = run_cli("search.run", *TINY, "n_trials=1", f"storage=sqlite:///{other}", cwd=tmp_path)
    assert result.returncode == 2 and "tables that are not Optuna's (invoices" in result.stderr
    with sqlite3.connect(other) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master")]
    assert tables == ["invoices"]
