"""Opening a study: storage, sampler, pruner, baselines and the config fingerprint that keeps a
resumed study from silently mixing trials run under different settings."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import TrialState

from search.config import DEFAULT_STORAGE, StudyConfig
from search.errors import SearchError
from search.recovery import retry
from search.space import searched_params

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A worker killed without a chance to clean up (SIGKILL, power loss) leaves its trial RUNNING;
# heartbeats let another host's process mark such trials FAIL and retry them
# (`search.recovery`; on the same host a dead owner is found at once).
HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 180


def make_sampler(config: StudyConfig) -> optuna.samplers.BaseSampler:
    name, seed = config.sampler.name, config.seed
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


def _parse(url: str, key: str = "storage") -> sqlalchemy.engine.URL:
    try:
        return sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise SearchError(f"{key}={url!r}: not a storage URL; write e.g. sqlite:///mlruns/optuna.db "
                          "or postgresql://user:password@host/db.") from None


def sqlite_path(url: str, key: str = "storage") -> Path | None:
    """The database file of a SQLite URL; None for a database server."""
    parsed = _parse(url, key)
    if parsed.get_backend_name() != "sqlite":
        return None
    if parsed.database in (None, "", ":memory:") or parsed.database.startswith("file::memory:"):
        raise SearchError(f"{key}={url}: names no database file (an in-memory database keeps no "
                          "study); write e.g. sqlite:///mlruns/optuna.db.")
    return Path(parsed.database).expanduser()


def check_writable(folder: Path, key: str, value: str, file: Path | None = None) -> None:
    """Fails with a message when `folder` (and `file`, if it exists) cannot be written, found by
    trying: permission bits (which root ignores) and read-only mounts fail alike."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
        if file is not None and file.exists():
            with open(file, "r+b"):
                pass
    except OSError as error:
        where = file if file is not None and file.exists() and folder.is_dir() else folder
        raise SearchError(f"{key}={value}: cannot write {where} ({error.strerror or error}). "
                          f"Make it writable, or point {key}= somewhere that is.") from None


def check_storage(url: str) -> None:
    """Fails early, with a message, when the storage URL is malformed, cannot be reached or
    cannot be written.

    The default SQLite file's folder is created; any other SQLite folder must already exist,
    so a typo in a path does not silently start a new, empty study somewhere else.
    """
    path = sqlite_path(url)
    if path is not None:
        folder = path.resolve().parent
        if url == DEFAULT_STORAGE:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise SearchError(f"storage={url}: cannot create the folder {folder} "
                                  f"({error.strerror or error}).") from None
        elif not folder.is_dir():
            raise SearchError(f"storage={url}: the folder {folder} does not exist.")
        check_writable(folder, "storage", url, path)
        return
    try:
        engine = sqlalchemy.create_engine(url, connect_args=_connect_timeout(_parse(url)))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as error:  # noqa: BLE001 - any driver error means "cannot use this storage"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SearchError(f"storage={url}: cannot connect ({reason}). Check that the database "
                          "server is running and the URL is right.") from None


def _connect_timeout(parsed: sqlalchemy.engine.URL) -> dict[str, Any]:
    return {"connect_timeout": 10} if parsed.get_backend_name() in ("postgresql", "mysql") else {}


def open_existing(url: str, hint: str = "") -> optuna.storages.RDBStorage:
    """Opens a storage that must already exist, for reading: nothing is created or written.

    A SQLite file whose folder cannot be written (a read-only mount, a copy on a CD) is opened
    as immutable, since SQLite would otherwise need to write its shared-memory file to read.
    """
    path = sqlite_path(url)
    if path is not None:
        if not path.is_file():
            default = " (the default storage)" if url == DEFAULT_STORAGE else ""
            raise SearchError(f"storage={url}{default}: no such database file "
                              f"{str(path)!r}; {hint or 'pass the storage= that search.run used.'}")
        try:
            check_writable(path.resolve().parent, "storage", url)
        except SearchError:
            url = f"sqlite:///file:{path.resolve()}?immutable=1&uri=true"
    else:
        check_storage(url)
    try:
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
        optuna.get_all_study_names(storage)  # reads the schema: is it an Optuna storage?
        return storage
    except Exception as error:  # noqa: BLE001 - any driver/schema error: not a usable storage
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SearchError(f"storage={url}: cannot be read as an Optuna storage ({reason}).") from None


def make_storage(url: str) -> optuna.storages.BaseStorage:
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS,
                                         grace_period=GRACE_SECONDS,
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


def write_ahead_log(connection: sqlite3.Connection) -> None:
    """Puts a SQLite file in write-ahead-log mode (see `make_storage` for why); the mode is
    kept in the file, so later readers use it too. MLflow's SQLite store gets the same."""
    with contextlib.suppress(sqlite3.OperationalError):  # busy in another process: only speed
        connection.execute("PRAGMA journal_mode=WAL")


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


def check_resume(config: StudyConfig) -> bool:
    """True when the study exists; refuses when its config differs. Reads only: a new study's
    storage is not created here."""
    path = sqlite_path(config.storage)
    if path is not None and not path.exists():
        return False
    try:
        storage = optuna.storages.RDBStorage(config.storage, skip_table_creation=True)
        study_id = existing_study_id(storage, config.study_name)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
        return False  # no Optuna tables yet: a new storage
    if study_id is None:
        return False
    stored = storage.get_study_user_attrs(study_id).get("fingerprint_source")
    current = json.loads(json.dumps(config.fingerprint_source(), default=str))
    if stored is not None and stored != current:
        changes = _differences(stored, current)
        listed = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        raise SearchError(
            f"study '{config.study_name}' in {config.storage} was created with a different config "
            f"({listed}). Resuming would mix incomparable trials: rerun with the original values to "
            f"resume it, or add study_name=NEW_NAME to start a new study.")
    return True


def open_study(config: StudyConfig) -> tuple[optuna.Study, bool]:
    """Creates the study (storing its config and enqueuing its baselines) or resumes it.

    Returns the study and whether it was resumed.
    """
    resumed = check_resume(config)
    storage = make_storage(config.storage)
    study = optuna.create_study(storage=storage, study_name=config.study_name,
                                direction="maximize", sampler=make_sampler(config),
                                pruner=make_pruner(config), load_if_exists=True)
    if not resumed:
        study.set_user_attr("fingerprint_source",
                            json.loads(json.dumps(config.fingerprint_source(), default=str)))
        study.set_user_attr("fingerprint", config.fingerprint())
        study.set_user_attr("config", json.loads(json.dumps(config.raw, default=str)))
        for model_key in ("model", "dataset", "epochs"):
            study.set_user_attr(model_key, getattr(config, model_key))
        for index, baseline in enumerate(config.baselines):
            study.enqueue_trial(searched_params(baseline, config.space),
                                user_attrs={"baseline": index}, skip_if_exists=True)
    else:
        _requeue_interrupted_baselines(study, config)
    return study, resumed


def _requeue_interrupted_baselines(study: optuna.Study, config: StudyConfig) -> None:
    """A baseline whose trial was interrupted (Ctrl-C) runs again on resume: it is the reference
    every other trial is compared with, so a study should not end up without it."""
    trials = study.get_trials(deepcopy=False)
    for index, baseline in enumerate(config.baselines):
        mine = [t for t in trials if t.user_attrs.get("baseline") == index]
        if mine and not any(t.state in (*FINISHED, TrialState.WAITING, TrialState.RUNNING) for t in mine):
            study.enqueue_trial(searched_params(baseline, config.space), user_attrs={"baseline": index})


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))
