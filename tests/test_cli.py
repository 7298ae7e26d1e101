"""The real command line, in subprocesses, on `dataset=fake`: help, --cfg, user errors,
pruning, Ctrl-C and resume, baselines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    AGGRESSIVE_PRUNER,
    FAKE,
    FINISHED,
    TINY,
    cli_env,
    load,
    run_cli,
    space_choices,
    start_cli,
    wait_for_running_trial,
)
from optuna.trial import TrialState

pytestmark = pytest.mark.slow  # every test here runs the command in a subprocess
# One lr range for every optimizer, reaching low enough that some trials barely learn.
ONE_LR_RANGE = ["space.lr.ranges=null", "space.lr.low=1e-5", "space.lr.high=0.3"]


def test_help_lists_keys_studies_and_examples(tmp_path):
    result = run_cli("search.run", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for fragment in ("usage: python -m search.run", "n_trials", "pruner", "space.NAME.FIELD",
                     "tracking_uri", "studies: cnn3, cnn3-fashion, resnet20", "examples:"):
        assert fragment in result.stdout


def test_help_into_a_closed_pipe_ends_quietly(tmp_path):
    """`python -m search.run --help | head -3`: the reader is gone before the help is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, as once `head` has exited
    try:
        result = subprocess.run([sys.executable, "-m", "search.run", "--help"], cwd=tmp_path,
                                env=cli_env(), stdout=write_end, stderr=subprocess.PIPE,
                                text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and "Traceback" not in result.stderr, result.stderr


def test_cfg_prints_the_resolved_config_and_runs_nothing(tmp_path):
    result = run_cli("search.run", "study=cnn3", "epochs=4", "space.weight_decay.high=0.005", "--cfg",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "epochs: 4" in result.stdout and "high: 0.005" in result.stdout
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("args, fragment", [
    (["study=cnn3", "epoch=3"], "did you mean 'epochs'"),
    (["study=cnn3", "space.lr.low=1", "space.lr.high=0.1"], "greater than high"),
    (["study=cnn3", "space.optimizer.choices=[sgd,"], "malformed"),
    (["study=nope"], "Available studies: cnn3, cnn3-fashion, resnet20"),
    (["study=cnn3", "dataset=cifar10", "data_dir=missing"], "cifar-10-batches-py"),
])
def test_user_errors_exit_2_without_traceback_or_storage(tmp_path, args, fragment):
    db = tmp_path / "o.db"
    result = run_cli("search.run", *args, f"storage=sqlite:///{db}", "tracking_uri=none", cwd=tmp_path)
    assert result.returncode == 2
    assert fragment in result.stderr and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr
    assert not db.exists()


def test_changed_config_on_resume_is_refused(tmp_path, storage):
    first = run_cli("search.run", *TINY, f"storage={storage}", "epochs=1", "n_trials=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    db = Path(storage.removeprefix("sqlite:///"))
    before = db.read_bytes()
    again = run_cli("search.run", *TINY, f"storage={storage}", "epochs=2", "n_trials=2", cwd=tmp_path)
    assert again.returncode == 2
    assert "epochs: 1 -> 2" in again.stderr and "study_name=" in again.stderr
    assert db.read_bytes() == before


def test_aggressive_pruner_prunes_and_reaches_n_trials(tmp_path, storage):
    result = run_cli("search.run", *TINY, f"storage={storage}", "epochs=4", "n_trials=8",
                     *AGGRESSIVE_PRUNER, "sampler=random", *ONE_LR_RANGE, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = load(storage).trials
    states = [t.state for t in trials]
    assert sum(s in FINISHED for s in states) == 8
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert all(t.user_attrs["pruned_at_epoch"] == t.user_attrs["epochs_run"] < 4 for t in pruned)
    assert "pruned" in result.stdout and "Best: trial" in result.stdout
    assert "optuna-dashboard" in result.stdout and "search.report" in result.stdout
    # Rerunning the finished study runs nothing more.
    again = run_cli("search.run", *TINY, f"storage={storage}", "epochs=4", "n_trials=8",
                    *AGGRESSIVE_PRUNER, "sampler=random", *ONE_LR_RANGE, cwd=tmp_path)
    assert again.returncode == 0 and "Nothing to do" in again.stdout
    assert len(load(storage).trials) == len(trials)


def test_baseline_is_trial_zero(tmp_path, storage):
    # Narrow the space around the shipped baseline instead of editing it: tiny but it still fits.
    args = [*FAKE, "tracking_uri=none", "device=cpu", *space_choices(
        {"width_1": [32], "width_2": [64], "width_3": [128], "hidden_1": [256]})]
    result = run_cli("search.run", *args, f"storage={storage}", "epochs=1",
                     "n_trials=1", "pruner=none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first = load(storage).trials[0]
    assert first.user_attrs["baseline"] == 0
    assert (first.params["optimizer"], first.params["lr"], first.params["batch_size"]) == ("adam", 1e-3, 64)
    assert first.params["kernel_size_1"] == 3 and first.params["dropout"] == 0.1
    assert "[baseline]" in result.stdout


def test_dry_run_builds_both_extremes_and_writes_nothing(tmp_path, storage):
    result = run_cli("search.run", *FAKE, "tracking_uri=none", "dry_run=true",
                     "space.batch_size.choices=[16,32]", f"storage={storage}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "smallest model ok" in result.stdout and "largest model ok" in result.stdout
    assert not Path(storage.removeprefix("sqlite:///")).exists()


@pytest.mark.parametrize("signum, status, reason", [
    (signal.SIGINT, 130, "interrupted by the user (Ctrl-C)"),
    (signal.SIGTERM, 143, "SIGTERM"),
])
def test_a_stop_signal_then_rerun_completes_without_lost_or_duplicated_trials(
        tmp_path, storage, signum, status, reason):
    args = [*TINY, f"storage={storage}", "epochs=3", "n_trials=4", "pruner=none"]
    process = start_cli("search.run", *args, cwd=tmp_path)
    # Interrupt once a trial has finished and the next one is running.
    wait_for_running_trial(storage, "cnn3", process,
                           lambda trials: any(t.state in FINISHED for t in trials))
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == status, err
    assert "Rerun the same command to resume" in err and "Traceback" not in err
    interrupted = load(storage).trials
    assert not [t for t in interrupted if t.state == TrialState.RUNNING]
    failed = [t for t in interrupted if t.state == TrialState.FAIL]
    assert len(failed) == 1 and reason in failed[0].user_attrs["fail_reason"]
    if signum == signal.SIGTERM:
        return  # the rerun is the same after either signal; it is checked once, after Ctrl-C

    rerun = run_cli("search.run", *args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "Resuming study" in rerun.stdout
    trials = load(storage).trials
    assert sum(t.state in FINISHED for t in trials) == 4
    assert [t.number for t in trials] == list(range(len(trials)))
    assert len(trials) == 4 + len(failed)
