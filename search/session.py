"""One process's part in a study run, the same for `search.run` and for every worker process:
check what can be checked, open the study, run trials until the study has its `n_trials`, and
close what the process opened.

The process that opened the study (`search.run`, workers=1 or the main process of workers=N)
is the only one that ends it (`Session.end`: the MLflow parent run, the summary); a worker only
closes its own observers.

How the trial budget is kept: `n_trials` is the number of finished (complete + pruned) trials the
study should have. A trial is *reserved* before Optuna starts it: under a lock shared by the
study's processes, the finished + running trials (+ trials failed during this run, which use up
the run's budget, so a study whose every trial fails still ends) are counted, and only if there
is room is a trial asked for; the lock is released once that trial is RUNNING in the storage. So
the processes start exactly the trials that are missing, and a rerun after Ctrl-C or failures
fills up the rest. Optuna's `MaxTrialsCallback` alone would overshoot by up to N-1 trials.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from search.artifacts import DashboardArtifacts
from search.config import StudyConfig
from search.data import SearchData, load_search_data
from search.errors import SearchError
from search.objective import Objective, StopSignal, TrialFailed
from search.params import format_params
from search.progress import describe_trial
from search.recovery import OWNER_ATTR, recover_dead_trials, this_process
from search.study import (
    FINISHED,
    check_resume,
    check_storage,
    count_finished,
    make_pruner,
    make_sampler,
    make_storage,
    open_study,
)
from search.trainer import resolve_device


def prepare(config: StudyConfig) -> tuple[torch.device, SearchData]:
    """Everything that can be checked before anything is written: the device, the data, the
    storage (reachable, writable, and a stored study's config unchanged) and the tracking store.
    A command refused here leaves no storage file, study or MLflow experiment behind."""
    device = resolve_device(config.device)
    check_workers(config, device)
    data = load_search_data(config.dataset, config.data_dir, val_size=config.val_size,
                            seed=config.seed)
    check_storage(config.storage)
    check_resume(config)
    if config.tracking_enabled:
        from search.tracking import check_tracking  # mlflow imports take ~2 s

        check_tracking(config.tracking_uri, config.study_name)
    return device, data


PROCESSES_PER_CORE = 4   # beyond this, trial processes only take turns on the CPU
PROCESSES_PER_GPU = 8    # small models: a few processes fill a GPU's idle gaps, more only queue


def check_workers(config: StudyConfig, device: torch.device) -> None:
    """Refuses a number of trial processes that cannot help (a typo such as workers=100000
    would start that many PyTorch processes), before any is started."""
    cores = os.cpu_count() or 1
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    limit = max(PROCESSES_PER_CORE * cores, PROCESSES_PER_GPU * gpus)
    if config.workers > config.n_trials:
        raise SearchError(f"workers={config.workers}: more trial processes than trials "
                          f"(n_trials={config.n_trials}); use at most workers={config.n_trials}.")
    if config.workers > limit:
        raise SearchError(
            f"workers={config.workers}: this machine has {cores} CPU core(s)"
            + (f" and {gpus} GPU(s)" if gpus else "") + f", which can hold at most {limit} trial "
            f"processes; more would only take turns. Use workers={min(limit, config.n_trials)} "
            "or fewer.")
    if device.type == "cpu" and config.workers > cores:
        print(f"note: workers={config.workers} on {cores} CPU core(s): the processes share the "
              "cores; on a CPU, workers=1 is usually as fast.", file=sys.stderr)


def _share_cpu(workers: int, device: torch.device) -> None:
    """On a CPU, each of N processes gets its share of the cores instead of all competing."""
    if device.type == "cpu" and workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@dataclasses.dataclass
class Session:
    """A study opened by this process, with the observers that record its trials."""

    config: StudyConfig
    device: torch.device
    data: SearchData
    study: optuna.Study
    observers: list
    study_run: object | None          # search.tracking.StudyRun when MLflow logging is on
    resumed: bool = False
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @classmethod
    def create(cls, config: StudyConfig, device: torch.device, data: SearchData) -> Session:
        """Opens (creating or resuming) the study, then its MLflow experiment; `prepare` has
        checked everything that can be checked first."""
        for reason in config.skipped_baselines:
            print(f"note: {reason}; that baseline is skipped.")
        study, resumed = open_study(config)  # baselines are enqueued here, once
        study_run, observers = make_observers(config)
        _share_cpu(config.workers, device)
        return cls(config, device, data, study, observers, study_run, resumed)

    @classmethod
    def join(cls, config: StudyConfig, index: int) -> Session:
        """A worker's view of a study the main process opened; its sampler has its own seed,
        or N workers would propose the same points."""
        device, data = prepare(config)
        study_run, observers = make_observers(config)
        sampler = make_sampler(dataclasses.replace(config, seed=config.seed + index))
        study = optuna.load_study(study_name=config.study_name, storage=make_storage(config.storage),
                                  sampler=sampler, pruner=make_pruner(config))
        _share_cpu(config.workers, device)
        return cls(config, device, data, study, observers, study_run, resumed=True)

    def describe(self) -> str:
        config, data = self.config, self.data
        workers = f", {config.workers} worker processes" if config.workers > 1 else ""
        return (f"{'Resuming' if self.resumed else 'Created'} study '{config.study_name}' in "
                f"{config.storage}: {config.model} on {config.dataset} ({len(data.train)} train / "
                f"{len(data.val)} val images), {config.epochs} epochs max, "
                f"{count_finished(self.study)}/{config.n_trials} trials finished, device "
                f"{self.device}{workers}.")

    def run_trials(self, stop: StopSignal, callbacks: list[Callable], *, since: datetime,
                   parent_pid: int | None = None) -> None:
        """Runs this process's share of the trials (see `run_reserved`)."""
        objective = Objective(self.config, self.data, self.device, self.observers, stop)
        run_reserved(self.study, objective, self.config, stop=stop, callbacks=callbacks,
                     since=since, parent_pid=parent_pid)

    def close(self) -> None:
        """Closes what this process opened (curves still being drawn, the logging cost line)."""
        for observer in self.observers:
            observer.close()

    def end(self, interrupted: bool) -> None:
        """Ends the study's run: closes this process's observers, then the MLflow parent run.
        Only the process that opened the study calls it."""
        self.close()
        if self.study_run is not None:
            self.study_run.end(self.study, interrupted)


def make_observers(config: StudyConfig) -> tuple[object | None, list]:
    """The trial observers of the optional integrations (MLflow, dashboard artifacts)."""
    observers: list = [DashboardArtifacts(config)]
    if not config.tracking_enabled:
        return None, observers
    from search.tracking import StudyRun, TrialLogger  # mlflow imports take ~2 s

    study_run = StudyRun(config)
    return study_run, [TrialLogger(study_run), *observers]


# ---------------------------------------------------------------- reserving trials

def run_reserved(study: optuna.Study, objective: Callable[[optuna.Trial], float],
                 config: StudyConfig, *, stop: StopSignal, callbacks: list[Callable],
                 since: datetime, parent_pid: int | None = None) -> None:
    """Runs trials one at a time, each reserved under the study's lock, until the study has
    its `n_trials` (or this run's budget is used up, `timeout` passes, or the parent process
    that started this worker is gone)."""
    deadline = time.monotonic() + config.timeout if config.timeout else None
    owner = this_process()
    while deadline is None or time.monotonic() < deadline:
        stop.check()
        if parent_pid is not None and os.getppid() != parent_pid:
            return
        with _Reservation(lock_path(config)) as reservation:
            if not _room_for_one_more(study, config.n_trials, since):
                return

            def reserved(trial: optuna.Trial) -> float:
                trial.set_user_attr(OWNER_ATTR, owner)  # who to ask whether it still runs
                reservation.release()  # the trial is RUNNING now: others may count it
                return objective(trial)

            study.optimize(reserved, n_trials=1, catch=(TrialFailed,),
                           callbacks=[*callbacks, stop.check])


def lock_path(config: StudyConfig) -> Path:
    """One lock file per (working directory, storage, study), in the temporary directory."""
    key = "\0".join((os.getcwd(), config.storage, config.study_name)).encode()
    return Path(tempfile.gettempdir()) / f"search-workers-{hashlib.sha1(key).hexdigest()[:16]}.lock"


class _Reservation:
    """Holds the study's lock from "is there room for one more trial?" until that trial is
    RUNNING in the storage (`release` is called from inside the objective)."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a")  # noqa: SIM115 - closed in release()
        fcntl.flock(self._file, fcntl.LOCK_EX)

    def __enter__(self) -> _Reservation:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def _room_for_one_more(study: optuna.Study, n_trials: int, since: datetime) -> bool:
    """Whether starting a trial now keeps the study within `n_trials` and this run's budget."""
    recover_dead_trials(study)  # trials of processes that died run again
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING, TrialState.FAIL))
    taken = sum(t.state in FINISHED or t.state == TrialState.RUNNING
                or (t.datetime_start is not None and t.datetime_start >= since) for t in trials)
    return taken < n_trials


# ---------------------------------------------------------------- what a person reads at the end

def storage_failure(config: StudyConfig, error: BaseException) -> str:
    """One paragraph for a storage that failed mid-run; what was committed stays consistent."""
    cause = getattr(error, "orig", None) or error.__cause__ or error.__context__ or error
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return (f"error: the storage {config.storage} failed while the study ran ({reason}). Every "
            "trial it recorded is intact (a failed write changes nothing); fix the cause (free "
            "disk space, restart the database server), then rerun the same command: it resumes "
            "the study and retries the interrupted trial.")


def print_summary(study: optuna.Study, config: StudyConfig) -> int:
    """The study's trial counts, its best trial and the commands to look further; exit code 0."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    print("Trials: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n))
    if not any(t.state == TrialState.COMPLETE for t in trials):
        print("No trial completed yet; rerun to continue the study.")
        return 0
    best = study.best_trial
    print(f"Best: {describe_trial(best)}")
    print(f"  params: {format_params(best.params, limit=99)}")
    args = f"study={config.study} storage={config.storage}"
    if config.study_name != config.study:
        args += f" study_name={config.study_name}"
    print("Next:")
    print(f"  python -m search.dashboard {args}   # optuna-dashboard: trials, curves, importances")
    if config.tracking_enabled and config.tracking_uri.startswith(("http://", "https://")):
        print(f"  open {config.tracking_uri} (MLflow)   # compare runs")
    elif config.tracking_enabled:
        print(f"  mlflow ui --backend-store-uri {config.tracking_uri}   # compare runs")
    print(f"  python -m search.report {args}   # tables, plots, final test accuracy")
    return 0
