"""`workers=N`: N trial processes share one study, for small models that leave a GPU mostly idle.

`python -m search.run study=cnn3 workers=4` runs the study in 4 processes against the same
storage: the command's own process opens the study first (creating it, storing its config and
enqueuing the baselines exactly once), then starts N-1 worker processes
(`python -m search.workers ...` with the same overrides) and works alongside them. A small model
cannot keep a GPU busy from one process (kernel launches, Python, storage writes and logging
between epochs all leave it idle); several processes fill those gaps. On a CPU the cores are
split between the processes.

How the trial budget is kept: `n_trials` is the number of finished (complete + pruned) trials
the study should have. Optuna's `MaxTrialsCallback` alone overshoots with several processes (it
checks after a trial ends, while the other workers may have just started theirs), so a worker
*reserves* each trial: under a file lock shared by the study's workers it counts finished +
running trials (+ trials failed during this run, which use up the run's budget as they do with one
process), and only if there is room does it ask Optuna for a trial, releasing the lock once that
trial is RUNNING in the storage. So between them the workers start exactly the trials that are
missing, and a rerun after Ctrl-C or failures fills up the rest, as with one process.

Each worker prints one line per trial it ran, prefixed `[worker i]`, with the study's finished
count. Ctrl-C (or `kill`) stops everything: the terminal's signal reaches only the main process
(the workers run in their own process group), which sends each worker one SIGTERM; each marks its
running trial FAIL, as a single process does, and the storage stays consistent. A worker whose
main process has died starts no new trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from search import run as run_module
from search.cli import main_guard
from search.config import StudyConfig, load_config
from search.objective import Objective, TrialFailed, load_search_data
from search.progress import describe_trial
from search.study import (FINISHED, check_resume, check_storage, count_finished, make_pruner,
                          make_sampler, make_storage, open_study)
from search.trainer import resolve_device

try:  # the core's safe-point handling of Ctrl-C/SIGTERM, where this version of it has one
    from search.objective import StopSignal
except ImportError:  # pragma: no cover - older core: a plain KeyboardInterrupt
    StopSignal = None

__all__ = ["run_workers", "work"]

WORKER_FLAG = "--worker"
STOP_GRACE_SECONDS = 60  # how long an interrupted worker may take to mark its trial FAIL


# ----------------------------------------------------------------------------------------------
# Reserving trials under a lock shared by the study's workers
# ----------------------------------------------------------------------------------------------


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

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def _room_for_one_more(study: optuna.Study, n_trials: int, since: datetime) -> bool:
    """Whether starting a trial now keeps the study within `n_trials` and this run's budget."""
    with contextlib.suppress(Exception):  # best effort: a trial whose worker was killed
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING, TrialState.FAIL))
    taken = sum(t.state in FINISHED or t.state == TrialState.RUNNING
                or (t.datetime_start is not None and t.datetime_start >= since) for t in trials)
    return taken < n_trials


class _TrialLines:
    """The per-trial line, prefixed with the worker, and the study's finished count."""

    def __init__(self, index: int, n_trials: int) -> None:
        self.index, self.n_trials = index, n_trials

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        print(f"[worker {self.index}] {describe_trial(trial)}  "
              f"({count_finished(study)}/{self.n_trials} finished)", flush=True)


def work(config: StudyConfig, study: optuna.Study, objective: Callable[[optuna.Trial], float], *,
         index: int, since: datetime, parent_pid: int | None = None, stop=None) -> None:
    """Runs trials one at a time, each reserved under the study's lock, until the study has its
    `n_trials` (or this run's budget is used up, or `timeout` passes, or the parent is gone).

    `stop` (a `StopSignal`) turns a held Ctrl-C into a KeyboardInterrupt between trials."""
    path = lock_path(config)
    callbacks = [_TrialLines(index, config.n_trials)] + ([stop.check] if stop is not None else [])
    deadline = time.monotonic() + config.timeout if config.timeout else None
    while deadline is None or time.monotonic() < deadline:
        if stop is not None:
            stop.check()
        if parent_pid is not None and os.getppid() != parent_pid:
            return
        reservation = _Reservation(path)
        try:
            if not _room_for_one_more(study, config.n_trials, since):
                return

            def reserved(trial: optuna.Trial) -> float:
                reservation.release()  # the trial is RUNNING now: others may count it
                return objective(trial)

            study.optimize(reserved, n_trials=1, catch=(TrialFailed,), callbacks=callbacks)
        finally:
            reservation.release()


def _stop_signal():
    """Ctrl-C and SIGTERM end the running trial as FAIL and stop the process: through the core's
    `StopSignal` (held until a safe point) where it exists, else as a plain KeyboardInterrupt.
    Installed explicitly, because a process started in the background inherits SIGINT ignored."""
    if StopSignal is None:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return None
    stop = StopSignal()
    stop.install()
    return stop


def _objective(config: StudyConfig, data, device: torch.device, observers: list, stop) -> Objective:
    return Objective(config, data, device, observers, **({"stop": stop} if stop is not None else {}))


def _share_cpu(workers: int, device: torch.device) -> None:
    """On a CPU, each of N processes gets its share of the cores instead of all competing."""
    if device.type == "cpu" and workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# ----------------------------------------------------------------------------------------------
# The main process: opens the study, starts the workers, works too, then sums up
# ----------------------------------------------------------------------------------------------


def run_workers(config: StudyConfig, overrides: list[str]) -> int:
    """`search.run` with `workers` > 1: everything a single run checks, then N processes."""
    device = resolve_device(config.device)
    data = load_search_data(config)
    check_storage(config.storage)
    check_resume(config, make_storage(config.storage))
    for reason in config.skipped_baselines:
        print(f"note: {reason}; that baseline is skipped.")
    observers = run_module.make_observers(config)
    study, resumed = open_study(config)  # before any worker: baselines are enqueued once
    done = count_finished(study)
    print(f"{'Resuming' if resumed else 'Created'} study '{config.study_name}' in {config.storage}: "
          f"{config.model} on {config.dataset} ({len(data.train)} train / {len(data.val)} val images), "
          f"{config.epochs} epochs max, {done}/{config.n_trials} trials finished, device {device}, "
          f"{config.workers} worker processes.", flush=True)
    if done >= config.n_trials:
        print("Nothing to do: the study already has its trials (raise n_trials= to run more).")
        return run_module.print_summary(study, config)
    _share_cpu(config.workers, device)
    stop = _stop_signal()
    since = datetime.now()
    started = time.perf_counter()
    command = [sys.executable, "-m", "search.workers", WORKER_FLAG, str(os.getpid()), since.isoformat()]
    workers: list[subprocess.Popen] = []
    try:
        for _ in range(config.workers - 1):
            # Own process group: Ctrl-C reaches only this process, which forwards it once.
            workers.append(subprocess.Popen([*command, str(len(workers) + 1), *overrides],
                                            process_group=0))
        work(config, study, _objective(config, data, device, observers, stop), index=0,
             since=since, stop=stop)
        while any(w.poll() is None for w in workers):  # polled: a held Ctrl-C must get through
            if stop is not None:
                stop.check()
            time.sleep(0.2)
        codes = [w.returncode for w in workers]
    except KeyboardInterrupt:
        _stop(workers)
        run_module.end_study(observers, study, interrupted=True)
        print(f"\nInterrupted after {time.perf_counter() - started:.0f} s: the running trials are "
              "marked FAIL and the storage is consistent. Rerun the same command to resume.",
              file=sys.stderr)
        return 130
    except BaseException:  # a bug or a user error in this process: the workers stop too
        _stop(workers)
        raise
    run_module.end_study(observers, study, interrupted=False)
    print(f"Ran for {time.perf_counter() - started:.0f} s with {config.workers} worker processes.")
    failed = [(i + 1, code) for i, code in enumerate(codes) if code != 0]
    for number, code in failed:
        print(f"warning: worker {number} exited with status {code}.", file=sys.stderr)
    finish = run_module.print_summary(study, config)
    return 1 if failed else finish


def _stop(workers: list[subprocess.Popen]) -> None:
    """One SIGTERM per worker (each marks its trial FAIL), then a kill for laggards.

    SIGTERM, not SIGINT: a command started in the background inherits SIGINT ignored."""
    for process in workers:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in workers:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ----------------------------------------------------------------------------------------------
# A worker process: `python -m search.workers --worker PARENT_PID SINCE INDEX key=value ...`
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        yield


def worker_main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] != WORKER_FLAG:
        print("usage: started by `python -m search.run ... workers=N`, not by hand.", file=sys.stderr)
        return 2
    parent_pid, since, index = int(argv[1]), datetime.fromisoformat(argv[2]), int(argv[3])
    stop = _stop_signal()
    try:
        config = load_config(argv[4:])
        device = resolve_device(config.device)
        _share_cpu(config.workers, device)
        with _quiet():
            data = load_search_data(config)
            observers = run_module.make_observers(config)
            # Its own sampler seed: with the same seed, N workers would propose the same points.
            sampler = make_sampler(dataclasses.replace(config, seed=config.seed + index))
            study = optuna.load_study(study_name=config.study_name,
                                      storage=make_storage(config.storage),
                                      sampler=sampler, pruner=make_pruner(config))
            work(config, study, _objective(config, data, device, observers, stop), index=index,
                 since=since, parent_pid=parent_pid, stop=stop)
    except KeyboardInterrupt:  # stopped by the main process, maybe before its first trial
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(worker_main))
