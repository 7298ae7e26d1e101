"""The Optuna objective: trial -> parameters from the space -> train -> report/prune -> record.

This is the only place where Optuna meets the trainer. Logging (MLflow, dashboard artifacts)
plugs in as `TrialObserver`s, so this module imports neither mlflow nor optuna-dashboard.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import optuna
import sqlalchemy
import torch

from search.config.settings import StudyConfig
from search.config.space import suggest
from search.storage.checkpoints import Checkpoints
from search.storage.recovery import retry
from search.storage.trials import TrialAttr
from search.training.images import SearchData
from search.training.loop import Speed, TrainingDiverged, train
from search.training.models import model_size
from search.training.results import EpochMetrics, best_of, trial_seed


class TrialFailed(Exception):
    """A trial that cannot finish (diverged, out of memory); the study goes on without it."""


class TrialObserver(Protocol):
    """Something that records trials as they run (MLflow, dashboard artifacts, ...)."""

    def trial_started(self, trial: optuna.Trial, params: dict[str, Any]) -> None: ...

    def epoch_ended(self, trial: optuna.Trial, metrics: EpochMetrics) -> None: ...

    def trial_finished(self, trial: optuna.Trial, state: optuna.trial.TrialState,
                       params: dict[str, Any], attrs: dict[str, Any],
                       history: list[EpochMetrics]) -> None: ...


class StopSignal:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a clean stop that never leaves a trial RUNNING.

    A signal that lands while a trial trains interrupts it at once (the trial is marked FAIL with
    its reason). One that lands in a storage write is held until the write is done (`held`): cut
    in the middle, a SQLite write can leave its connection holding the database's lock, and the
    FAIL that follows then finds the database locked. One that lands in Optuna's bookkeeping
    between trials, where an interruption could leave a freshly asked trial RUNNING, is held
    until the end of that bookkeeping (`check`, an Optuna callback) or the start of the next trial.
    """

    REASONS = {signal.SIGINT: "interrupted by the user (Ctrl-C)",
               signal.SIGTERM: "SIGTERM: the process was asked to stop (kill, a job scheduler)"}

    def __init__(self) -> None:
        self.requested = False
        self.signum = signal.SIGINT
        self.reason = self.REASONS[signal.SIGINT]  # what a stopped trial's fail_reason says
        self._in_trial = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.signum = signum
            self.reason = self.REASONS.get(signum, f"stopped by signal {signum}")
        self.requested = True
        if self._in_trial:
            raise KeyboardInterrupt

    def enter_trial(self) -> None:
        self._in_trial = True
        self.check()

    def leave_trial(self) -> None:
        self._in_trial = False

    def check(self, *_: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Storage writes inside a trial: a signal waits for them, then interrupts."""
        inside, self._in_trial = self._in_trial, False
        try:
            yield
        finally:
            self._in_trial = inside
        if inside:
            self.check()

    @property
    def exit_status(self) -> int:
        """What a shell expects of a process that stopped on this signal (130, 143)."""
        return 128 + int(self.signum)


# The storage itself failing (disk full, database server gone) is no fault of the trial: the
# run stops, and the trial is recovered when the same command runs again.
STORAGE_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError,
                  sqlite3.Error)


def storage_cause(error: BaseException) -> BaseException | None:
    """The storage failure behind an error, if there is one. Optuna turns a storage that fails
    while it records a failed trial into `AssertionError("Should not reach.")`, with the
    storage's error as its context, so the chain is followed."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, STORAGE_ERRORS):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


class Objective:
    """Callable passed to `study.optimize`; returns the final epoch's validation accuracy.

    The final epoch (not the best one) is the value, because the report retrains for the full
    budget without a validation set to pick an epoch; the best epoch is still recorded.
    """

    def __init__(self, config: StudyConfig, data: SearchData, device: torch.device,
                 observers: Sequence[TrialObserver] = (), stop: StopSignal | None = None,
                 checkpoints: Checkpoints | None = None) -> None:
        self.stop = stop
        self.checkpoints = checkpoints
        self.config = config
        self.data = data
        self.device = device
        self.observers = list(observers)

    def __call__(self, trial: optuna.Trial) -> float:
        history: list[EpochMetrics] = []
        state = optuna.trial.TrialState.FAIL
        params: dict[str, Any] = {}
        attrs: dict[str, Any] = {}
        observing: list[TrialObserver] = []
        started = time.perf_counter()
        taken_over = False  # failed meanwhile by another process, which retries it
        requeued = False    # stopped by a signal and queued again: its checkpoint is handed on

        stop = self.stop or StopSignal()  # one never installed holds nothing

        def on_epoch(metrics: EpochMetrics) -> bool:
            with stop.held():
                history.append(metrics)
                trial.report(metrics.val_accuracy, metrics.epoch)
                for observer in self.observers:
                    observer.epoch_ended(trial, metrics)
                return trial.should_prune()

        def checkpoint(state: Callable[[], dict[str, Any]]) -> None:
            with stop.held():
                save(state)

        out_of_memory = False
        try:
            # Inside the try, so that a Ctrl-C while sampling still records why the trial failed.
            stop.check()
            params = suggest(trial, self.config.space)
            fixed = {k: v for k, v in params.items() if k not in trial.params}
            if fixed:
                trial.set_user_attr(TrialAttr.FIXED_PARAMS, fixed)
            speed = Speed.for_device(self.device)
            trial.set_user_attr(TrialAttr.PRECISION, speed.precision)  # before observers tag it
            for observer in self.observers:
                observer.trial_started(trial, params)
                observing.append(observer)
            budget = self.config.max_params
            if budget:
                size = model_size(self.config.model, params, self.data.spec)
                # TPE and GP learn where models are too large: > 0 is infeasible.
                trial.set_constraint("max_params", size - budget)
                if size > budget:
                    # Never trained, and not counted toward n_trials (see counts_toward_n_trials in search.storage.trials).
                    attrs = {TrialAttr.OVER_BUDGET: size, TrialAttr.PARAMETER_COUNT: size,
                             TrialAttr.EPOCHS_RUN: 0}
                    state = optuna.trial.TrialState.PRUNED
                    _record(trial, attrs)
                    raise optuna.TrialPruned(f"{size:,} parameters, over max_params")
            # A retry of a dead trial keeps its seed, and goes on from its last checkpoint.
            seed = trial.user_attrs.get(TrialAttr.SEED, trial_seed(self.config.seed, trial.number))
            trial.set_user_attr(TrialAttr.SEED, seed)
            resume = self.checkpoints.resume_state(trial) if self.checkpoints else None
            for metrics in map(lambda m: EpochMetrics(**m), resume["history"] if resume else ()):
                history.append(metrics)  # the epochs trained before, reported again
                trial.report(metrics.val_accuracy, metrics.epoch)
                for observer in self.observers:
                    observer.epoch_ended(trial, metrics)
            save = self.checkpoints.saver(trial) if self.checkpoints else None
            stop.enter_trial()  # from here a signal interrupts the training at once
            result = train(self.config.model, params, train_data=self.data.train,
                           val_data=self.data.val, spec=self.data.spec, epochs=self.config.epochs,
                           seed=seed, device=self.device, on_epoch=on_epoch, resume_from=resume,
                           checkpoint=checkpoint if save else None, speed=speed)
            stop.leave_trial()
            attrs = _summary(history, result.parameter_count, time.perf_counter() - started)
            if resume:
                attrs[TrialAttr.RESUMED_FROM_EPOCH] = resume["epoch"]
            if result.stopped_early:
                attrs[TrialAttr.PRUNED_AT_EPOCH] = history[-1].epoch
                state = optuna.trial.TrialState.PRUNED
                _record(trial, attrs)
                raise optuna.TrialPruned(f"pruned after epoch {history[-1].epoch}")
            state = optuna.trial.TrialState.COMPLETE
            _record(trial, attrs)
            return history[-1].val_accuracy
        except optuna.TrialPruned:
            raise
        except STORAGE_ERRORS:
            state = optuna.trial.TrialState.RUNNING  # as it stays: its retry needs the checkpoint
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            # This process was stopped (SIGSTOP, a hung machine) and another failed the trial by
            # heartbeat: it takes no more writes, and its retry may resume from its checkpoint.
            # `search.runner.process.reserve_and_run` says so and goes on.
            taken_over = True
            raise
        except KeyboardInterrupt:
            stop.leave_trial()  # a second Ctrl-C must not cut recording the first
            attrs = self._fail(trial, history, stop.reason, started)
            # Stopped from outside (a scheduler's time limit, preemption, requeue or scancel;
            # Ctrl-C): no fault of its parameters, so it runs again, from its checkpoint.
            retry(trial.study, trial)
            requeued = True
            raise
        except Exception as error:  # noqa: BLE001 - one bad sample must never end the study
            reason = _failure(error)
            out_of_memory = is_out_of_memory(error)
            attrs = self._fail(trial, history, reason, started)
            # Raised below, outside this block: raised here, the TrialFailed would carry the
            # error as its context, and with it the training frames (model, optimizer, data on
            # the device), which Optuna's bookkeeping keeps alive after the trial.
        finally:
            stop.leave_trial()
            # A trial taken over takes no more writes; the run's end closes its MLflow run.
            for observer in [] if taken_over else observing:
                observer.trial_finished(trial, state, params, attrs, history)
            if (self.checkpoints is not None and state != optuna.trial.TrialState.RUNNING
                    and not taken_over and not requeued):
                self.checkpoints.discard(trial)
        # Only a failed trial gets here (every other path returned or raised). The error and its
        # traceback are gone with the `except` block, so the failed training's tensors are
        # unreferenced: collected (cycles too) and their cached blocks handed back to the GPU,
        # before the next trial, or a neighbour process on the same GPU, needs them.
        if out_of_memory:
            free_device_memory(self.device)
        raise TrialFailed(reason)

    def _fail(self, trial: optuna.Trial, history: list[EpochMetrics], reason: str,
              started: float) -> dict[str, Any]:
        attrs = _summary(history, None, time.perf_counter() - started)
        attrs[TrialAttr.FAIL_REASON] = reason
        _record(trial, attrs)
        return attrs


def free_device_memory(device: torch.device) -> None:
    """Collects unreferenced objects (reference cycles included) and, on CUDA, returns the
    allocator's cached blocks to the driver, so other processes on the GPU can use them."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _failure(error: Exception) -> str:
    """The fail_reason of a trial that raised `error`; expected failures (divergence, running out
    of memory) in a few words, anything else (a sampled combination that cannot be built, a bug)
    with its type, and a warning so that a person notices."""
    if isinstance(error, TrainingDiverged):
        return f"diverged: {error}"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if is_out_of_memory(error):
        return f"out of memory: {first_line}"
    print(f"warning: a trial failed with {type(error).__name__}: {first_line}; the study goes "
          "on without it.", file=sys.stderr, flush=True)
    return f"{type(error).__name__}: {first_line}"[:2000]


def _summary(history: list[EpochMetrics], parameter_count: int | None, seconds: float) -> dict[str, Any]:
    """The per-trial facts the report and the dashboard show next to the value."""
    attrs: dict[str, Any] = {TrialAttr.EPOCHS_RUN: len(history),
                             TrialAttr.TRAIN_SECONDS: round(seconds, 3)}
    if parameter_count is not None:
        attrs[TrialAttr.PARAMETER_COUNT] = parameter_count
    best = best_of(history)
    if best is not None:
        attrs[TrialAttr.BEST_EPOCH] = best.epoch
        attrs[TrialAttr.BEST_VAL_ACCURACY] = best.val_accuracy
    if history:
        attrs[TrialAttr.SECONDS_PER_EPOCH] = sum(m.epoch_seconds for m in history) / len(history)
        attrs[TrialAttr.IMAGES_PER_SECOND] = sum(m.images_per_second for m in history) / len(history)
        # Every epoch's metrics, so that MLflow runs can be rebuilt from the study (`search.sync`).
        attrs[TrialAttr.EPOCHS] = [{"epoch": m.epoch, **m.as_dict()} for m in history]
    return attrs


def _record(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
