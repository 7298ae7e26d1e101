"""Opening a study: storage, sampler, pruner, baselines and the config fingerprint that keeps a
resumed study from silently mixing trials run under different settings."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import TrialState

from search.config.errors import SearchError, first_line
from search.config.settings import DEFAULT_STORAGE, StudyConfig, shown_tree
from search.config.space import searched_params
from search.config.urls import (
    DatabaseLock,
    backend,
    check_driver,
    check_writable,
    masked,
    parse,
    sqlite_path,
    write_ahead_log,
)
from search.storage.recovery import retry

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A worker killed without a chance to clean up (SIGKILL, power loss) leaves its trial RUNNING;
# heartbeats let another host's process mark such trials FAIL and retry them
# (`search.storage.recovery`; on the same host a dead owner is found at once).
HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 180


def make_sampler(config: StudyConfig, seed: int) -> optuna.samplers.BaseSampler:
    name = config.sampler.name
    if name == "tpe":
        # constant_liar keeps parallel workers from proposing the same point.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=config.sampler.n_startup_trials,
                                          constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=config.sampler.n_startup_trials)
    raise SearchError(f"sampler={name!r}: unknown; allowed: tpe, random, gp.")


class HyperbandPruner(optuna.pruners.HyperbandPruner):
    """Optuna's Hyperband pruner, minus one storage read per sampled parameter.

    Optuna hands the sampler a fresh per-bracket study for every parameter it samples, and each
    fresh study re-reads every trial from the storage (about 100 ms per trial of cnn3's space
    on SQLite). The bracket study shares the real study's trial cache instead, which Optuna
    refreshes once per trial; the pruning decisions themselves still read the storage.
    """

    def _create_bracket_study(self, study: optuna.Study, bracket_id: int) -> optuna.Study:
        bracket_study = super()._create_bracket_study(study, bracket_id)
        bracket_study._thread_local = study._thread_local
        return bracket_study


def make_pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    """Pruning is the early stopping: every pruner works on epochs as its resource."""
    p, epochs = config.pruner, config.epochs
    if p.name == "hyperband":
        return HyperbandPruner(min_resource=p.min_resource, max_resource=epochs,
                               reduction_factor=p.reduction_factor)
    if p.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource,
                                                      reduction_factor=p.reduction_factor)
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials,
                                           n_warmup_steps=p.n_warmup_steps)
    if p.name == "patient":
        # The hand-tuned reports' rule: stop once validation accuracy has not improved for
        # `patience` epochs.
        return optuna.pruners.PatientPruner(None, patience=p.patience)
    if p.name == "none":
        return optuna.pruners.NopPruner()
    raise SearchError(f"pruner={p.name!r}: unknown; allowed: hyperband, median, "
                      "successive_halving, patient, none.")


def check_storage(url: str) -> None:
    """Fails early, with a message, when the storage URL is malformed, cannot be reached or
    cannot be written.

    The default SQLite file's folder is created; any other SQLite folder must already exist,
    so a typo in a path does not silently start a new, empty study somewhere else.
    """
    parse(url)
    check_driver(url, "storage")
    path = sqlite_path(url)
    if path is not None:
        folder = path.resolve().parent
        if url == DEFAULT_STORAGE:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise SearchError(f"storage={masked(url)}: cannot create the folder {folder} "
                                  f"({error.strerror or error}).") from None
        elif not folder.is_dir():
            raise SearchError(f"storage={masked(url)}: the folder {folder} does not exist.")
        check_writable(folder, "storage", url, path)
        return
    try:
        engine = sqlalchemy.create_engine(url, connect_args=_connect_timeout(url))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as error:  # noqa: BLE001 - any driver error means "cannot use this storage"
        raise SearchError(f"storage={masked(url)}: cannot connect ({masked(first_line(error))}). "
                          "Check that the database server is running and the URL is right.") from None


def _connect_timeout(url: str) -> dict[str, Any]:
    return {"connect_timeout": 10} if backend(url) in ("postgresql", "mysql") else {}


def open_existing(url: str) -> tuple[optuna.storages.RDBStorage, list[str]]:
    """Opens a storage that must already exist, for reading: nothing is created or written.
    Returns it and the names of its studies (reading them proves it is an Optuna storage).

    A SQLite file whose folder cannot be written (a read-only mount, a copy on a CD) is opened
    as immutable, since SQLite would otherwise need to write its shared-memory file to read.
    """
    path = sqlite_path(url)
    if path is not None:
        if not path.is_file():
            default = " (the default storage)" if url == DEFAULT_STORAGE else ""
            raise SearchError(f"storage={masked(url)}{default}: no such database file "
                              f"{str(path)!r}; pass the storage= that search.run used.")
        try:
            check_writable(path.resolve().parent, "storage", url)
        except SearchError:
            url = f"sqlite:///file:{path.resolve()}?immutable=1&uri=true"
    else:
        check_storage(url)
    try:
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
        return storage, optuna.get_all_study_names(storage)
    except Exception as error:  # noqa: BLE001 - any driver/schema error: not a usable storage
        raise SearchError(f"storage={masked(url)}: cannot be read as an Optuna storage "
                          f"({masked(first_line(error))}).") from None


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """The study's storage, with heartbeats and retries of dead trials (`search.storage.recovery`).

    Creating a new database's tables is serialised (`DatabaseLock`): several processes started
    at once on a fresh PostgreSQL database would otherwise race in Optuna's schema creation.
    Connections are checked before use, so a restarted database server is reconnected to.
    """
    with DatabaseLock(url, "optuna-schema"):
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs={"pool_pre_ping": True} if sqlite_path(url) is None else None,
            heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=retry)
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


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config trees, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return found
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def existing_study_id(storage: optuna.storages.BaseStorage, name: str) -> int | None:
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        return None


def _storage_if_any(url: str) -> optuna.storages.RDBStorage | None:
    """The storage at `url` opened for reading, or None where it has no Optuna tables yet (a
    SQLite file not created, a new database): checks run before a study is created and must not
    create the storage."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return None
    try:
        return optuna.storages.RDBStorage(url, skip_table_creation=True)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
        return None


def check_resume(config: StudyConfig) -> bool:
    """True when the study exists; refuses when its config differs. Reads only: a new study's
    storage is not created here."""
    storage = _storage_if_any(config.storage)
    study_id = existing_study_id(storage, config.study_name) if storage is not None else None
    if study_id is None:
        return False
    stored = storage.get_study_user_attrs(study_id).get("fingerprint_source")
    current = json.loads(json.dumps(config.fingerprint_source(), default=str))
    if stored is not None and stored != current:
        changes = _differences(stored, current)
        listed = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        raise SearchError(
            f"study '{config.study_name}' in {masked(config.storage)} was created with a different config "
            f"({listed}). Resuming would mix incomparable trials: rerun with the original values to "
            f"resume it, or add study_name=NEW_NAME to start a new study.")
    return True


def open_study(config: StudyConfig) -> tuple[optuna.Study, bool, int]:
    """Creates the study (storing its config and enqueuing its baselines) or joins it.

    Exactly one process creates a study, even when several start at once on a new one: the
    study's row is unique in the storage. The creator's sampler takes the study seed, so a fresh
    single-process run is reproducible; every other process (a worker, a second machine, a
    resumed run) seeds its sampler from the study seed, the trials so far, its host and its pid,
    so that concurrent and resumed processes explore different points.

    Returns the study, whether this process created it, and its sampler's seed.
    """
    storage = make_storage(config.storage)
    try:
        optuna.create_study(storage=storage, study_name=config.study_name, direction="maximize")
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        created = False
        check_resume(config)  # it may have been created a moment ago, by another process
    study = optuna.load_study(study_name=config.study_name, storage=storage,
                              pruner=make_pruner(config))
    seed = config.seed if created else process_seed(config.seed, len(study.get_trials(deepcopy=False)))
    study.sampler = make_sampler(config, seed)
    if created:
        study.set_user_attr("fingerprint_source",
                            json.loads(json.dumps(config.fingerprint_source(), default=str)))
        study.set_user_attr("fingerprint", config.fingerprint())
        study.set_user_attr("config", json.loads(json.dumps(shown_tree(config), default=str)))
        for model_key in ("model", "dataset", "epochs"):
            study.set_user_attr(model_key, getattr(config, model_key))
        for index, baseline in enumerate(config.baselines):
            study.enqueue_trial(searched_params(baseline, config.space),
                                user_attrs={"baseline": index}, skip_if_exists=True)
        if config.warm_start:
            warm_start(study, config)
    else:
        with DatabaseLock(config.storage, f"trials:{config.study_name}"):
            _requeue_interrupted_baselines(study, config)
    return study, created, seed


def process_seed(study_seed: int, trials_so_far: int) -> int:
    """A sampler seed of this process's own (see `open_study`)."""
    key = f"{study_seed}:{trials_so_far}:{socket.gethostname()}:{os.getpid()}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % (2**31 - 1)


def check_warm_start(config: StudyConfig) -> None:
    """The studies to warm-start from must exist in the storage (read only)."""
    if not config.warm_start:
        return
    if config.study_name in config.warm_start:
        raise SearchError(f"warm_start={config.study_name}: a study cannot warm-start from itself.")
    storage = _storage_if_any(config.storage)
    names = optuna.get_all_study_names(storage) if storage is not None else []
    missing = [name for name in config.warm_start if name not in names]
    if missing:
        raise SearchError(f"warm_start={missing[0]}: no study of that name in "
                          f"{masked(config.storage)} (studies there: {', '.join(names) or 'none'}).")


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
            kept, resolved = {}, {}
            for spec in config.space:
                if not spec.is_active(resolved):
                    continue
                if spec.kind == "fixed":
                    resolved[spec.name] = spec.value
                elif spec.name in trial.params and spec.contains(trial.params[spec.name], resolved):
                    kept[spec.name] = resolved[spec.name] = trial.params[spec.name]
                else:
                    added.add(spec.name)
            dropped |= set(trial.params) - set(kept)
            study.enqueue_trial(kept, user_attrs={"warm_start": f"{name}#{trial.number}"},
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
        mine = [t for t in trials if t.user_attrs.get("baseline") == index]
        if mine and not any(t.state in (*FINISHED, TrialState.WAITING, TrialState.RUNNING) for t in mine):
            study.enqueue_trial(searched_params(baseline, config.space), user_attrs={"baseline": index})


OVER_BUDGET_ATTR = "over_budget"  # parameter count of a model over max_params, never trained


def counts(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts toward n_trials: finished (complete or pruned), and trained."""
    return trial.state in FINISHED and OVER_BUDGET_ATTR not in trial.user_attrs


def count_finished(study: optuna.Study) -> int:
    return sum(map(counts, study.get_trials(deepcopy=False, states=FINISHED)))
