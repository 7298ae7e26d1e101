"""Opening a study: storage, sampler, pruner, baselines and the config fingerprint that keeps a
resumed study from silently mixing trials run under different settings."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import warnings
from collections.abc import Sequence
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from search.config.errors import SearchError
from search.config.settings import StudyConfig, shown_tree
from search.config.space import LEFT_OUT, ParamSpec, searched_params, walk
from search.config.urls import StoreUrl
from search.storage.backends import DatabaseLock, write_ahead_log
from search.storage.checks import check_unchanged, is_created
from search.storage.recovery import retry, this_process
from search.config.strategies import make_pruner, make_sampler
from search.storage.trials import FINISHED, StudyAttr, TrialAttr


# A worker killed without a chance to clean up (SIGKILL, power loss) leaves its trial RUNNING;
# heartbeats let another host's process mark such trials FAIL and retry them
# (`search.storage.recovery`; on the same host a dead owner is found at once). The environment
# variables SEARCH_HEARTBEAT_SECONDS and SEARCH_HEARTBEAT_GRACE_SECONDS override them (tests).
def quiet_optuna() -> None:
    """Optuna's own per-trial log lines and its "experimental" warnings (heartbeats are flagged
    so) mean nothing to users: the commands print their own progress."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 180


def _seconds(variable: str, default: int) -> int:
    """A whole, positive number of seconds from the environment; unset or empty: `default`."""
    value = os.environ.get(variable, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) <= 0:
        raise SearchError(f"{variable}={value!r}: a whole number of seconds > 0 is needed.")
    return int(value)


STALE_REASON = ("its process sent no heartbeat within the grace period: stopped, hung or cut "
                "off")


class _OwnedTrialsStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, except that a trial this process starts is RUNNING only together
    with its owner (`search.storage.recovery` asks the owner whether the trial still runs): a
    new trial is created with the owner in the same transaction, and a queued one gets its owner
    just before it is made RUNNING. A process killed at any moment leaves no RUNNING trial that
    nobody can recover."""

    owner: dict[str, Any]

    def _create_new_trial(self, study_id: int,
                          template_trial: FrozenTrial | None = None) -> FrozenTrial:
        # (the private method: Optuna's cache wrapper calls it, not create_new_trial)
        if template_trial is None:  # study.ask(): a new trial, RUNNING at once
            template_trial = optuna.trial.create_trial(
                state=TrialState.RUNNING, user_attrs={TrialAttr.OWNER: self.owner})
        return super()._create_new_trial(study_id, template_trial)

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        if state == TrialState.RUNNING:  # a queued trial taken: its owner first
            self.set_trial_user_attr(trial_id, TrialAttr.OWNER, self.owner)
        elif state == TrialState.FAIL and TrialAttr.FAIL_REASON not in self.get_trial(
                trial_id).user_attrs:
            # Every FAIL of this package records its reason first, but Optuna's own heartbeat
            # check (fail_stale_trials, before each trial) fails a stale trial without one.
            self.set_trial_user_attr(trial_id, TrialAttr.FAIL_REASON, STALE_REASON)
        return super().set_trial_state_values(trial_id, state, values)


def make_storage(url: StoreUrl) -> optuna.storages.BaseStorage:
    """The study's storage, with heartbeats and retries of dead trials (`search.storage.recovery`).

    Creating a new database's tables is serialised (`DatabaseLock`): several processes started
    at once on a fresh PostgreSQL database would otherwise race in Optuna's schema creation.
    Connections are checked before use, so a restarted database server is reconnected to.
    """
    with DatabaseLock(url, "optuna-schema"):
        storage = _OwnedTrialsStorage(
            url.raw, engine_kwargs={"pool_pre_ping": True} if url.sqlite_file is None else None,
            heartbeat_interval=_seconds("SEARCH_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS),
            grace_period=_seconds("SEARCH_HEARTBEAT_GRACE_SECONDS", GRACE_SECONDS),
            heartbeat_stale_trial_callback=retry)
    storage.owner = this_process()
    if storage.engine.dialect.name == "sqlite":
        # Every suggested parameter, report and attribute is a commit; in SQLite's default
        # rollback-journal mode each one waits on several disk syncs (about half of a trial's
        # sampling time). Write-ahead logging with synchronous=NORMAL syncs only at checkpoints,
        # stays consistent after a crash (only the last commits can be lost, on power loss),
        # and lets the dashboard and other workers read while a trial writes.
        storage.engine.dispose()  # connections opened while creating the tables lack the pragmas
        sqlalchemy.event.listen(storage.engine, "connect", _fast_sqlite_connection)
    return storage


def _fast_sqlite_connection(connection: sqlite3.Connection, _record: Any) -> None:
    write_ahead_log(connection)
    connection.execute("PRAGMA synchronous=NORMAL")


def open_study(config: StudyConfig) -> tuple[optuna.Study, bool, int]:
    """Creates the study (storing its config and enqueuing its baselines) or joins it.

    Exactly one process creates a study, even when several start at once on a new one: the
    study's row is unique in the storage, and its config, baselines and warm starts are stored
    under the study's `trials:` lock, the `StudyAttr.CREATED_COMPLETE` marker last, by the first
    process to find the row without that marker: the process that made the row, or, where that
    one died half-way, whichever process opens the study next (no trial can have run under
    another config, so it completes the study with its own).

    The creator's sampler takes the study seed, so a fresh single-process run is reproducible;
    every other process (a worker, a second machine, a resumed run) seeds its sampler from the
    study seed, the trials so far, its host and its pid, so that concurrent and resumed
    processes explore different points.

    Returns the study, whether this process created it (stored its config), and its sampler's
    seed.
    """
    storage = make_storage(config.storage)
    try:
        optuna.create_study(storage=storage, study_name=config.study_name, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        pass  # made by another process, a moment ago or long ago, completely or half-way
    study = optuna.load_study(study_name=config.study_name, storage=storage,
                              pruner=make_pruner(config.pruner, config.epochs))
    with DatabaseLock(config.storage, f"trials:{config.study_name}"):
        created = not is_created(storage, storage.get_study_id_from_name(config.study_name))
        if created:
            _store_creation(study, config)
        else:  # its config must match, even when it was created a moment ago
            check_unchanged(config, study.user_attrs)
            _requeue_interrupted_baselines(study, config)
    seed = config.seed if created else process_seed(config.seed, len(study.get_trials(deepcopy=False)))
    study.sampler = make_sampler(config.sampler, seed)
    return study, created, seed


def _store_creation(study: optuna.Study, config: StudyConfig) -> None:
    """Everything a study is created with, the marker last: a process killed before it leaves a
    half-made study that the next one completes (`open_study`). Queued trials a dead creator
    left are not queued twice (`skip_if_exists`)."""
    study.set_user_attr(StudyAttr.FINGERPRINT_SOURCE,
                        json.loads(json.dumps(config.fingerprint_source(), default=str)))
    study.set_user_attr(StudyAttr.FINGERPRINT, config.fingerprint())
    study.set_user_attr(StudyAttr.CONFIG, json.loads(json.dumps(shown_tree(config), default=str)))
    for key in (StudyAttr.MODEL, StudyAttr.DATASET, StudyAttr.EPOCHS):
        study.set_user_attr(key, getattr(config, key))
    for index, baseline in enumerate(config.baselines):
        study.enqueue_trial(searched_params(baseline, config.space),
                            user_attrs={TrialAttr.BASELINE: index}, skip_if_exists=True)
    if config.warm_start:
        warm_start(study, config)
    study.set_user_attr(StudyAttr.CREATED_COMPLETE, True)


def process_seed(study_seed: int, trials_so_far: int) -> int:
    """A sampler seed of this process's own (see `open_study`)."""
    key = f"{study_seed}:{trials_so_far}:{socket.gethostname()}:{os.getpid()}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % (2**31 - 1)


def warm_start(study: optuna.Study, config: StudyConfig) -> None:
    """Queues the best `warm_start_top_k` complete configurations of each `warm_start` study,
    after the baselines. Parameters this space lacks, or whose values it cannot produce, are
    dropped; parameters it adds are sampled."""
    queued, dropped, added = 0, set(), set()
    for name in config.warm_start:
        other = optuna.load_study(study_name=name, storage=study._storage)
        best = sorted(other.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                      key=lambda t: -t.value)[:config.warm_start_top_k]
        for trial in best:
            def choose(spec: ParamSpec, params: dict, values: dict = trial.params) -> Any:
                if spec.name in values and spec.contains(values[spec.name], params):
                    return values[spec.name]
                added.add(spec.name)
                return LEFT_OUT
            kept = searched_params(walk(config.space, choose), config.space)  # no fixed: not Optuna's
            dropped |= set(trial.params) - set(kept)
            study.enqueue_trial(kept, user_attrs={TrialAttr.WARM_START: f"{name}#{trial.number}"},
                                skip_if_exists=True)
            queued += 1
    print(f"warm start: {queued} configuration(s) of {', '.join(config.warm_start)} queued after "
          "the baselines" + (f"; dropped (not in this space): {', '.join(sorted(dropped))}"
                             if dropped else "")
          + (f"; sampled (new here or out of range): {', '.join(sorted(added))}" if added else "")
          + ".", flush=True)


def _requeue_interrupted_baselines(study: optuna.Study, config: StudyConfig) -> None:
    """A baseline whose trial was interrupted (Ctrl-C) runs again on resume: it is the reference
    every other trial is compared with, so a study should not end up without it."""
    trials = study.get_trials(deepcopy=False)
    for index, baseline in enumerate(config.baselines):
        mine = [t for t in trials if t.user_attrs.get(TrialAttr.BASELINE) == index]
        if mine and not any(t.state in (*FINISHED, TrialState.WAITING, TrialState.RUNNING) for t in mine):
            study.enqueue_trial(searched_params(baseline, config.space),
                                user_attrs={TrialAttr.BASELINE: index})


