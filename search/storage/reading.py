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

from search.config.errors import SearchError
from search.config.settings import (
    DEFAULT_STORAGE,
    SETTINGS,
    StudyConfig,
    build_config,
    resolve_tree,
)
from search.config.urls import masked
from search.storage.studies import open_existing

# Keys that say where things are on this machine, not what the study is: a user may point
# them elsewhere when reading a study (another data folder, another device, another MLflow).
LOCAL_KEYS = ("data_dir", "device", "tracking_uri")
LOCATION_KEYS = ("study", "storage", "study_name", *LOCAL_KEYS)


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
    stored = study.user_attrs.get("config")
    if not isinstance(stored, dict):
        return StudySource(current, study, config_from_storage=False)
    # Keys a study stored that today's config no longer has (e.g. `direction`) are dropped.
    tree = {**current.raw, **{k: v for k, v in stored.items() if k in SETTINGS}}
    tree["storage"], tree["study_name"] = current.storage, current.study_name
    for key in LOCAL_KEYS:
        if key in overrides:
            tree[key] = current.raw[key]
    return StudySource(build_config(tree), study)


def load_stored_study(url: str, name: str) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """A study that must exist, from a storage opened for reading (`study.open_existing`)."""
    storage, names = open_existing(url)
    if name not in names:
        hint = difflib.get_close_matches(name, names, n=1)
        raise SearchError(
            f"no study named '{name}' in {masked(url)}" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f". Studies there: {', '.join(names) or 'none'}. Pass storage=URL and/or "
            "study_name=NAME as given to search.run.")
    return optuna.load_study(study_name=name, storage=storage), storage


def location_args(config: StudyConfig) -> str:
    """`study=... [storage=...] [study_name=...]`: the words that find this study again."""
    words = [f"study={config.study}"]
    if config.storage != DEFAULT_STORAGE:
        words.append(f"storage={masked(config.storage)}")
    if config.study_name != config.study:
        words.append(f"study_name={config.study_name}")
    return " ".join(words)


def retrain_command(config: StudyConfig, trial_number: int, *, full: bool = False) -> str:
    """The exact command that trains a trial's configuration again."""
    return (f"python -m search.train {location_args(config)} trial={trial_number}"
            + (" full=true" if full else ""))
