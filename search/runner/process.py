"""One process's part in a study run, the same for `search.run` and for every worker process:
open the study (after `search.runner.preflight` has checked what can be checked), run trials until
the study has its `n_trials`, and close what the process opened.

The process that opened the study (`search.run`, workers=1 or the main process of workers=N)
is the only one that ends it (`Session.end`: the MLflow parent run, the summary); a worker only
closes its own observers.

How the trial budget is kept: `n_trials` is the number of finished (complete + pruned) trials the
study should have. A trial is *reserved* before Optuna starts it: under a lock shared by the
study's processes, the finished + running trials (+ trials failed during this run, which use up
the run's budget, so a study whose every trial fails still ends) are counted, and only if there
is room is a trial asked for; the lock is released once that trial is RUNNING in the storage. So
the processes start exactly the trials that are missing, and a rerun after Ctrl-C or failures
fills up the rest. Optuna's `MaxTrialsCallback` alone would overshoot by up to N-1 trials. A trial
that recovery failed (its process died or stopped, `search.storage.recovery`) is not counted: its
retry is.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from search.config.settings import StudyConfig
from search.runner.objective import Objective, StopSignal, TrialFailed
from search.runner.preflight import prepare, usable_cpus
from search.storage.backends import DatabaseLock, artifact_store
from search.storage.checkpoints import Checkpoints
from search.storage.recovery import recover_dead_trials, retried
from search.storage.studies import open_study
from search.storage.trials import (
    TrialAttr,
    count_finished,
    counts_toward_n_trials,
)
from search.tracking.dashboard_artifacts import DashboardArtifacts
from search.training.images import SearchData


def _share_cpu(workers: int, device: torch.device) -> None:
    """On a CPU, each of N processes gets its share of the usable CPUs instead of all competing
    (one process keeps PyTorch's own choice, which OMP_NUM_THREADS and the binding set)."""
    if device.type == "cpu" and workers > 1:
        torch.set_num_threads(max(1, usable_cpus() // workers))


@dataclasses.dataclass
class Session:
    """A study opened by this process, with the observers that record its trials."""

    config: StudyConfig
    device: torch.device
    data: SearchData
    study: optuna.Study
    observers: list
    study_run: object | None          # search.tracking.study_run.ParentRun when MLflow logging is on
    created: bool                     # this process created the study
    sampler_seed: int
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @classmethod
    def open(cls, config: StudyConfig, device: torch.device, data: SearchData, *,
             main: bool = True) -> Session:
        """Opens (creating or joining) the study, then its MLflow experiment; `prepare` has
        checked everything that can be checked first."""
        study, created, seed = open_study(config)  # baselines are enqueued here, once
        if created:
            for reason in config.skipped_baselines:
                print(f"note: {reason}; that baseline is skipped.")
        study_run, observers = make_observers(config, write_note=main)
        _share_cpu(config.workers, device)
        return cls(config, device, data, study, observers, study_run, created, seed)

    @classmethod
    def join(cls, config: StudyConfig) -> Session:
        """A worker's view of the study its main process opened."""
        return cls.open(config, *prepare(config, worker=True), main=False)

    def describe(self) -> str:
        config, data = self.config, self.data
        workers = f", {config.workers} worker processes" if config.workers > 1 else ""
        threads = (f" ({torch.get_num_threads()} of {usable_cpus()} usable CPUs)"
                   if self.device.type == "cpu" else "")
        return (f"{'Created' if self.created else 'Resuming'} study '{config.study_name}' in "
                f"{config.storage}: {config.model} on {config.dataset} ({len(data.train)} train / "
                f"{len(data.val)} val images), {config.epochs} epochs max, "
                f"{count_finished(self.study)}/{config.n_trials} trials finished, device "
                f"{self.device}{threads}{workers}.")

    def run_trials(self, stop: StopSignal, callbacks: list[Callable], *, since: datetime,
                   parent_pid: int | None = None) -> None:
        """Runs this process's share of the trials (see `reserve_and_run`)."""
        checkpoints = (None if self.config.checkpoint_every is None else
                       Checkpoints(artifact_store(self.config.storage), self.config.checkpoint_every))
        objective = Objective(self.config, self.data, self.device, self.observers, stop,
                              checkpoints)
        reserve_and_run(self.study, objective, self.config, stop=stop, callbacks=callbacks,
                     since=since, parent_pid=parent_pid, sampler_seed=self.sampler_seed)

    def close(self) -> None:
        """Closes what this process opened (curves still being drawn, the logging cost line)."""
        for observer in self.observers:
            observer.close()

    def end(self, interrupted: bool) -> None:
        """Ends the study's run: closes this process's observers, then the MLflow parent run.
        Only the process that opened the study calls it."""
        self.close()
        if self.study_run is not None:
            from search.tracking.trial_runs import end_study  # mlflow is loaded already

            end_study(self.study_run, self.study, interrupted)

    @property
    def experiment_id(self) -> str | None:
        """The study's MLflow experiment; None when MLflow logging is off."""
        return None if self.study_run is None else self.study_run.experiment_id


def make_observers(config: StudyConfig, write_note: bool = True) -> tuple[object | None, list]:
    """The trial observers of the optional integrations (MLflow, dashboard artifacts). Only the
    main process writes the dashboard's study note: importing optuna-dashboard (and with it
    scikit-learn) would cost every worker process about 95 MB."""
    if not config.tracking_enabled:
        return None, [DashboardArtifacts(config, write_note=write_note)]
    from search.tracking.live import TrialLogger  # mlflow imports take ~2 s
    from search.tracking.study_run import ParentRun

    study_run = ParentRun(config)
    return study_run, [TrialLogger(study_run),
                       DashboardArtifacts(config, study_run.experiment_id, write_note=write_note)]


# ---------------------------------------------------------------- reserving trials

def reserve_and_run(study: optuna.Study, objective: Callable[[optuna.Trial], float],
                    config: StudyConfig, *, stop: StopSignal, callbacks: list[Callable],
                    since: datetime, parent_pid: int | None = None,
                    sampler_seed: int | None = None) -> None:
    """Runs trials one at a time, each reserved under the study's lock, until the study has
    its `n_trials` (or this run's budget is used up, `timeout` passes, or the parent process
    that started this worker is gone).

    The lock is the storage's (`DatabaseLock`: an advisory lock on PostgreSQL, a file lock for a
    SQLite file), so processes on any number of machines share it. The trial's owner is recorded
    with the trial itself (`search.storage.studies`), so a process killed at any moment leaves
    a trial that the next one recovers.
    """
    deadline = time.monotonic() + config.timeout if config.timeout else None
    while deadline is None or time.monotonic() < deadline:
        stop.check()
        if parent_pid is not None and os.getppid() != parent_pid:
            return
        with DatabaseLock(config.storage, f"trials:{config.study_name}") as reservation:
            if not _room_for_one_more(study, config.n_trials, since):
                return

            started: list[optuna.Trial] = []

            def reserved(trial: optuna.Trial) -> float:
                reservation.release()  # the trial is RUNNING now: others may count it
                started.append(trial)
                if sampler_seed is not None:
                    trial.set_user_attr(TrialAttr.SAMPLER_SEED, sampler_seed)
                return objective(trial)

            try:
                study.optimize(reserved, n_trials=1, catch=(TrialFailed,),
                               callbacks=[*callbacks, stop.check])
            except (ValueError, UpdateFinishedTrialError, AssertionError):
                # This process was stopped (SIGSTOP, a hung machine) long enough for another to
                # fail its trial by heartbeat and queue it again: Optuna then refuses every
                # write, the final tell included ("Cannot tell a FAIL trial"). Stopped after the
                # objective returned, Optuna 5's `_run_trial` finds the trial FAIL with no error
                # of its own to log and raises `AssertionError("Should not reach.")` instead.
                if not started or started[0].number not in retried(
                        study.get_trials(deepcopy=False)):
                    raise
                print(f"trial {started[0].number} was failed by another process while this one "
                      "was stopped (it is retried); going on.", file=sys.stderr, flush=True)


# Models over max_params are cheap to skip, but a run stops proposing them after this many per
# trial wanted: a budget that almost nothing in the space fits must end, not spin.
OVER_BUDGET_PER_TRIAL = 10


def _room_for_one_more(study: optuna.Study, n_trials: int, since: datetime) -> bool:
    """Whether starting a trial now keeps the study within `n_trials` and this run's budget."""
    recover_dead_trials(study)  # trials of processes that died run again
    trials = study.get_trials(deepcopy=False)
    recovered = retried(trials)  # failed by recovery: their retries count instead
    recent = [t for t in trials if t.datetime_start is not None and t.datetime_start >= since]
    if sum(TrialAttr.OVER_BUDGET in t.user_attrs for t in recent) >= OVER_BUDGET_PER_TRIAL * n_trials:
        print(f"warning: {OVER_BUDGET_PER_TRIAL * n_trials} sampled models were over max_params "
              "in this run; stopping. Raise max_params or narrow the space.", file=sys.stderr)
        return False
    taken = sum(counts_toward_n_trials(t) or t.state == TrialState.RUNNING
                or (t.state == TrialState.FAIL and t in recent and t.number not in recovered)
                for t in trials)
    return taken < n_trials
