"""Every check of the storage made before anything is written: the URL, its driver, its folder or
server, what an existing file is, and, when the study exists, that its config is unchanged and
that the warm-start studies are there. The storage is opened once, read-only, for all of them;
a refused command leaves no file, table or study behind."""

from __future__ import annotations

import json
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import TrialState

from search.config.errors import SearchError, first_line
from search.config.settings import StudyConfig
from search.config.urls import StoreUrl, check_writable, masked
from search.storage.backends import DatabaseLock
from search.storage.trials import StudyAttr


def check_storage(config: StudyConfig) -> bool:
    """Refuses, with a message naming `storage=`, a storage that cannot be used for this study;
    returns whether the study exists already (a resume). A half-made study (`is_created`) is
    not one yet: the run that opens it completes its creation with this config."""
    stored = open_if_exists(config.storage)
    if stored is None:
        _check_warm_start(config, [])
        return False
    try:
        study_id = existing_study_id(stored, config.study_name)
        resume = study_id is not None and is_created(stored, study_id)
        if resume:
            check_unchanged(config, stored.get_study_user_attrs(study_id))
        _check_warm_start(config, optuna.get_all_study_names(stored))
        return resume
    finally:
        stored.engine.dispose()  # read once: its connection is not held for the whole run


def check_folder(url: StoreUrl) -> None:
    """A SQLite file's folder must exist (the default one is created) and be writable: a typo in
    a path must not silently start a new, empty study somewhere else."""
    folder = url.sqlite_file.resolve().parent
    if url.is_default:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SearchError(f"{url.key}={url}: cannot create the folder {folder} "
                              f"({error.strerror or error}).") from None
    elif not folder.is_dir():
        raise SearchError(f"{url.key}={url}: the folder {folder} does not exist.")
    check_writable(folder, url.key, url, url.sqlite_file)


def _connect_timeout(url: StoreUrl) -> dict[str, Any]:
    return {"connect_timeout": 10} if url.backend in ("postgresql", "mysql") else {}


def table_names(url: StoreUrl) -> list[str] | None:
    """The tables of the database at `url`, or None where a SQLite file does not exist yet.
    Only reads: a missing file or folder stays missing (a command that will write checks the
    folder first, `check_folder`).

    Raises:
        SearchError: the server cannot be reached, or the file is not a SQLite database.
    """
    url.parsed  # noqa: B018 - a malformed URL is refused here, with its own message
    url.check_driver()
    database = url.sqlite_file
    if database is not None and not database.exists():
        return None
    engine = sqlalchemy.create_engine(url.raw, connect_args=_connect_timeout(url))
    try:
        with engine.connect() as connection:
            return sqlalchemy.inspect(connection).get_table_names()
    except Exception as error:  # noqa: BLE001 - any driver error means "cannot use this storage"
        if database is not None:
            raise SearchError(f"{url.key}={url}: {database} exists but is not a SQLite database "
                              f"({first_line(error)}). Point {url.key}= at another file.") from None
        raise SearchError(f"{url.key}={url}: cannot connect ({masked(first_line(error))}). "
                          "Check that the database server is running and the URL is right.") from None
    finally:
        engine.dispose()


def open_if_exists(url: StoreUrl) -> optuna.storages.RDBStorage | None:
    """The Optuna storage at `url` opened for reading, or None where it has no tables yet (a new
    file, an empty database): nothing is created here but the default storage's folder, which
    the run that asks is about to write to.

    Raises:
        SearchError: as `table_names`; or the database holds another program's tables.
    """
    if url.sqlite_file is not None:
        check_folder(url)
    tables = table_names(url)
    if not tables:
        return None
    if "studies" not in tables:
        raise SearchError(f"{url.key}={url}: the database holds tables that are not Optuna's "
                          f"({', '.join(sorted(tables)[:4])}, ...): another program's data. "
                          f"Point {url.key}= at an Optuna storage or a new database.")
    try:
        # Under the lock that the process creating the tables holds (`make_storage`): Optuna's
        # storage writes its version row and stamps alembic_version where they are missing, and
        # between that process's tables and its stamp two stamps collide (a UniqueViolation).
        with DatabaseLock(url, "optuna-schema"):
            return optuna.storages.RDBStorage(url.raw, skip_table_creation=True)
    except Exception as error:  # noqa: BLE001 - any driver/schema error: not a usable storage
        raise SearchError(f"{url.key}={url}: cannot be read as an Optuna storage "
                          f"({masked(first_line(error))}).") from None


def existing_study_id(storage: optuna.storages.BaseStorage, name: str) -> int | None:
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        return None


def is_created(storage: optuna.storages.BaseStorage, study_id: int) -> bool:
    """Whether the study's creation was completed: its `StudyAttr.CREATED_COMPLETE` marker is
    stored, or a trial has started in it (a study made before the marker existed). A study row
    without either is half-made: its creator died before storing its config and baselines."""
    if StudyAttr.CREATED_COMPLETE in storage.get_study_user_attrs(study_id):
        return True
    started = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return bool(storage.get_all_trials(study_id, deepcopy=False, states=started))


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config trees, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return found
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def check_unchanged(config: StudyConfig, study_attrs: dict[str, Any]) -> None:
    """Refuses to resume a study whose stored config differs from this one."""
    stored = study_attrs.get(StudyAttr.FINGERPRINT_SOURCE)
    current = json.loads(json.dumps(config.fingerprint_source(), default=str))
    if stored is not None and stored != current:
        changes = _differences(stored, current)
        listed = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        raise SearchError(
            f"study '{config.study_name}' in {config.storage} was created with a different config "
            f"({listed}). Resuming would mix incomparable trials: rerun with the original values to "
            f"resume it, or add study_name=NEW_NAME to start a new study.")


def _check_warm_start(config: StudyConfig, names: list[str]) -> None:
    """The studies to warm-start from must exist in the storage."""
    if not config.warm_start:
        return
    if config.study_name in config.warm_start:
        raise SearchError(f"warm_start={config.study_name}: a study cannot warm-start from itself.")
    missing = [name for name in config.warm_start if name not in names]
    if missing:
        raise SearchError(f"warm_start={missing[0]}: no study of that name in "
                          f"{config.storage} (studies there: {', '.join(names) or 'none'}).")
