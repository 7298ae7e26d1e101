"""Several processes on one study, and processes that die: real CLI processes, real SQLite and
PostgreSQL storages, real MLflow stores. After any of it, the study ends with exactly `n_trials`
finished trials, nothing RUNNING, no configuration tried twice, and one MLflow run per trial."""

from __future__ import annotations

import os
import signal

import optuna
import pytest
from helpers import (
    FINISHED,
    SMALL,
    check_study,
    finish,
    run_cli,
    start_cli,
    trained_an_epoch,
    wait_for_running_trial,
)
from mlflow import MlflowClient
from optuna.trial import FrozenTrial, TrialState

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")]
ARGS = [*SMALL, "pruner=none", "sampler=random"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_processes_started_at_once_on_a_new_study_share_it_exactly(backend, tmp_path, request):
    if backend == "postgresql":
        storage, tracking = request.getfixturevalue("pg_databases")
    else:
        storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    # Three processes at the same moment on fresh Optuna and MLflow databases: the schemas are
    # created once, the study once, the baseline once, and the budget is shared exactly.
    baseline = "baselines=[{optimizer: adam, lr: 0.001, beta1: 0.9, beta2: 0.999}]"
    processes = [start_cli("search.run", *ARGS, "epochs=1", "n_trials=7", baseline,
                           f"storage={storage}", f"tracking_uri={tracking}", cwd=tmp_path)
                 for _ in range(3)]
    results = [finish(p, timeout=300) for p in processes]
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
    study = check_study(storage, 7, tracking)
    assert [t.number for t in study.trials if t.user_attrs.get("baseline") == 0] == [0]
    seeds = {t.user_attrs["sampler_seed"] for t in study.trials if "sampler_seed" in t.user_attrs}
    assert len(seeds) >= 2  # each process samples with its own seed
    assert sum("Created study" in r.stdout for r in results) == 1


def test_kill_9_mid_trial_then_the_same_command_recovers_at_once(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    command = [*ARGS, "epochs=10", "n_trials=2", "checkpoint_every=0", f"storage={storage}",
               f"tracking_uri={tracking}"]
    process = start_cli("search.run", *command, cwd=tmp_path)

    def checkpointed(trials: list[FrozenTrial]) -> bool:
        """A trial has trained a few epochs and saved a checkpoint."""
        return trained_an_epoch(trials) and any(
            t.state == TrialState.RUNNING and t.user_attrs.get("checkpoint", {}).get("epoch", 0) >= 2
            for t in trials)

    wait_for_running_trial(storage, "cnn3", process, checkpointed)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    killed = [t for t in optuna.load_study(study_name="cnn3", storage=storage).trials
              if t.state == TrialState.RUNNING]
    assert len(killed) == 1
    # Immediately: no waiting for a heartbeat to go stale.
    again = run_cli("search.run", *command, cwd=tmp_path, timeout=400)
    assert again.returncode == 0, again.stderr
    study = check_study(storage, 2, tracking)
    dead = study.trials[killed[0].number]
    assert dead.state == TrialState.FAIL and "died" in dead.user_attrs["fail_reason"]
    [retry] = [t for t in study.trials if t.user_attrs.get("retry_of") == dead.number]
    assert retry.params == dead.params and retry.state in FINISHED
    assert retry.user_attrs["seed"] == dead.user_attrs["seed"]
    # It went on from the dead trial's last checkpoint, with the epochs before it reported again.
    resumed = retry.user_attrs["resumed_from_epoch"]
    assert resumed >= dead.user_attrs["checkpoint"]["epoch"] >= 2
    for epoch in range(1, resumed + 1):
        assert retry.intermediate_values[epoch] == dead.intermediate_values[epoch]
    assert not list((tmp_path / "optuna-artifacts").glob("checkpoint-*"))  # removed once done
    # The killed trial's MLflow run was closed as FAILED, the retry's run says what it repeats.
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("cnn3").experiment_id])
    by_number = {r.data.tags.get("trial_number"): r for r in runs}
    assert by_number[str(dead.number)].info.status == "FAILED"
    assert by_number[str(retry.number)].data.tags["retry_of"] == str(dead.number)


def test_kill_9_of_one_of_four_workers_loses_no_trial(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    command = [*ARGS, "epochs=6", "n_trials=5", "workers=4", f"storage={storage}",
               "tracking_uri=none"]
    main = start_cli("search.run", *command, cwd=tmp_path)

    def workers_pids(trials: list[FrozenTrial]) -> list[int]:
        """The processes, other than `main`, that run a RUNNING trial."""
        owners = [t.user_attrs.get("owner", {}) for t in trials if t.state == TrialState.RUNNING]
        return [o["pid"] for o in owners if o.get("pid") not in (None, main.pid)]

    def a_worker_trains(trials: list[FrozenTrial]) -> bool:
        return trained_an_epoch(trials) and bool(workers_pids(trials))

    trials = wait_for_running_trial(storage, "cnn3", main, a_worker_trains, timeout=180)
    victim = workers_pids(trials)[0]
    os.kill(victim, signal.SIGKILL)
    result = finish(main, timeout=400)
    assert "exited with status -9" in result.stderr  # the main process says a worker died
    again = run_cli("search.run", *command, cwd=tmp_path, timeout=400)  # at once
    assert again.returncode == 0, again.stderr
    check_study(storage, 5)
    # Every process printed its trials, prefixed with its index, with the study's count.
    assert "[worker 0]" in again.stdout + result.stdout and "[worker " in result.stdout
