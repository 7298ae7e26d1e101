"""Opening a finished (or still running) study for reading, without writing to it: its storage
and the config it stored.

The storage URL and study name resolve exactly as in `search.run` (the study file through
`load_config`, then `storage=` / `study_name=` overrides); what the trials *mean* (model, data
set, epochs, space, baselines) comes from the config the study stored when it was created, so a
study file edited since cannot change how old trials are read or retrained.
"""

from __future__ import annotations

import difflib
from typing import Any, NamedTuple

import optuna

from search.config.command_keys import LOCAL_KEYS, LOCATION_KEYS
from search.config.errors import SearchError, first_line
from search.config.settings import SETTINGS, StudyConfig, build_config, resolve_tree
from search.config.urls import StoreUrl, check_writable, masked
from search.storage.backends import DatabaseLock
from search.storage.checks import table_names
from search.storage.trials import StudyAttr



class StudySource(NamedTuple):
    """A study opened for reading, with the config its trials were run under."""

    config: StudyConfig
    study: optuna.Study
    # Whether the config came from the study itself (False: an old study without one, read
    # with today's study file).
    config_from_storage: bool = True


def open_source(overrides: dict[str, Any]) -> StudySource:
    """Opens the study named by `study=` (and optional `storage=`, `study_name=`, local keys).

    Raises:
        SearchError: unknown study file, storage that does not exist or cannot be reached,
            no study of that name in the storage, or a key that is not a location key.
    """
    unknown = [key for key in overrides if key not in LOCATION_KEYS]
    if unknown:
        raise SearchError(
            f"{unknown[0]}: cannot be changed when reading a study (its trials were run with the "
            f"values the study stored); allowed here: {', '.join(LOCATION_KEYS)}.")
    current = build_config(resolve_tree(list(overrides.items())))
    study, _ = load_stored_study(current.storage, current.study_name)
    stored = study.user_attrs.get(StudyAttr.CONFIG)
    if not isinstance(stored, dict):
        return StudySource(current, study, config_from_storage=False)
    # Keys a study stored that today's config no longer has (e.g. `direction`) are dropped.
    tree = {**current.raw, **{k: v for k, v in stored.items() if k in SETTINGS}}
    tree["storage"], tree["study_name"] = current.storage.raw, current.study_name
    for key in LOCAL_KEYS:
        if key in overrides:
            tree[key] = current.raw[key]
    return StudySource(build_config(tree), study)


def open_existing(url: StoreUrl) -> tuple[optuna.storages.RDBStorage, list[str]]:
    """Opens a storage that must already exist, for reading: nothing is created or written.
    Returns it and the names of its studies (reading them proves it is an Optuna storage).

    A SQLite file whose folder cannot be written (a read-only mount, a copy on a CD) is opened
    as immutable, since SQLite would otherwise need to write its shared-memory file to read.
    """
    raw, database = url.raw, url.sqlite_file
    if database is not None:
        if not database.is_file():
            default = " (the default storage)" if url.is_default else ""
            raise SearchError(f"{url.key}={url}{default}: no such database file "
                              f"{str(database)!r}; pass the storage= that search.run used.")
        try:
            check_writable(database.resolve().parent, url.key, url)
        except SearchError:
            raw = f"sqlite:///file:{database.resolve()}?immutable=1&uri=true"
    else:
        table_names(url)  # the server answers
    try:
        # Under the schema lock the writers hold while they create the tables and stamp their
        # version (`open_if_exists`, `make_storage`): Optuna's storage stamps a version it finds
        # missing, and a reader stamping beside a new database's first writer collides with it.
        with DatabaseLock(url, "optuna-schema"):
            storage = optuna.storages.RDBStorage(raw, skip_table_creation=True)
        return storage, optuna.get_all_study_names(storage)
    except Exception as error:  # noqa: BLE001 - any driver/schema error: not a usable storage
        raise SearchError(f"{url.key}={url}: cannot be read as an Optuna storage "
                          f"({masked(first_line(error))}).") from None


def load_stored_study(url: StoreUrl, name: str) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """A study that must exist, from a storage opened for reading (`open_existing`)."""
    storage, names = open_existing(url)
    if name not in names:
        hint = difflib.get_close_matches(name, names, n=1)
        raise SearchError(
            f"no study named '{name}' in {url}" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f". Studies there: {', '.join(names) or 'none'}. Pass storage=URL and/or "
            "study_name=NAME as given to search.run.")
    return optuna.load_study(study_name=name, storage=storage), storage


def retrain_command(config: StudyConfig, trial_number: int, *, full: bool = False) -> str:
    """The exact command that trains a trial's configuration again."""
    return (f"python -m search.train {config.location_args()} trial={trial_number}"
            + (" full=true" if full else ""))
