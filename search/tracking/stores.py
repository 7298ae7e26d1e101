"""Checking an MLflow tracking store before anything is written to it.

`check_tracking` runs before a study is opened, so an unreachable server or an unusable file stops
the run before any trial; `check_existing_tracking` guards the commands that only read a store
(`search.predict`, `search.load_model`), which must never create one. `short_reason` is how every
MLflow failure of the package is told to a person: on one line.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from unittest.mock import patch
from urllib.parse import urlparse

from mlflow import MlflowClient

from search.config.errors import SearchError
from search.config.urls import DEFAULTS, StoreUrl, masked
from search.storage.backends import DatabaseLock
from search.storage.checks import check_folder, table_names

# Tables every MLflow database has: a store without them is not MLflow's (or not one yet).
MLFLOW_TABLES = {"experiments", "runs", "alembic_version"}
OFF_ADVICE = " Add tracking_uri=none to run the study without MLflow logging."


def short_reason(error: BaseException) -> str:
    """The part of an MLflow/requests error a person needs, on one line."""
    text = " ".join(str(error).split())
    for marker in ("Connection refused", "Name or service not known", "timed out",
                   "No route to host", "Temporary failure in name resolution"):
        if marker.lower() in text.lower():
            return marker.lower()
    return (text[:300] + "...") if len(text) > 300 else (text or type(error).__name__)


def check_tracking(uri: StoreUrl, experiment: str | None = None, *,
                   advice: str = OFF_ADVICE) -> None:
    """Fails with a `SearchError` when the MLflow tracking store at `uri` cannot be used.

    Called before the study is opened, so an unreachable server stops the run before any trial;
    it writes nothing (a new SQLite store is created on first use, after the study). The default
    SQLite store's folder is created. `advice` ends every refusal (what else the user can do).

    Raises:
        SearchError: the URI is a plain directory (MLflow 3's file store is not supported), its
            folder does not exist or cannot be written, an existing file is not a database, the
            server does not answer, or the study's experiment (`experiment`) is deleted there.
    """
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not "Creating initial tables..."
    _refuse_file_store(uri, advice)
    if not uri.is_http:
        try:
            if uri.sqlite_file is not None:
                check_folder(uri)
            if table_names(uri) is None:
                return  # a new SQLite file: created on first use
        except SearchError as error:
            raise SearchError(f"{error}{advice}") from None
    try:
        # One quick try: no retries, a short timeout (read when the request is made).
        # A database store's first use creates its tables: under the lock that ParentRun takes.
        with patch.dict(os.environ, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                        MLFLOW_HTTP_REQUEST_TIMEOUT="10"), \
                DatabaseLock(uri, "mlflow-schema"):
            client = MlflowClient(uri.raw)
            found = (client.get_experiment_by_name(experiment) if experiment
                     else client.search_experiments(max_results=1) and None)
    except Exception as error:  # noqa: BLE001 - any failure here means "cannot log there"
        hint = (" Start it (e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db "
                "--host 127.0.0.1 --port 5000`) or fix the URL." if uri.is_http else "")
        raise SearchError(f"tracking_uri={uri}: cannot reach the MLflow tracking store "
                          f"({masked(short_reason(error))}).{hint}{advice}") from None
    if found is not None:
        refuse_deleted(found, uri)


def _refuse_file_store(uri: StoreUrl, advice: str) -> None:
    scheme = urlparse(uri.raw).scheme
    if scheme in ("", "file") or re.fullmatch(r"[A-Za-z]", scheme):  # a path (C:\ on Windows)
        raise SearchError(
            f"{uri.key}={uri}: a directory is MLflow's old file store, which MLflow 3 no longer "
            f"supports. Use a database such as {DEFAULTS['tracking_uri']} (the default) or the "
            "http:// URL of an `mlflow server`." + advice)


def check_existing_tracking(uri: StoreUrl) -> None:
    """Fails with a `SearchError` unless `uri` is an MLflow store that exists already: for the
    commands that only read one (`search.predict`, `search.load_model`), which must never create
    a store. MLflow's client creates and migrates any database it is pointed at, so a typo in
    `tracking_uri=` would become a new, empty store: it is only made once this check passes.
    A server must answer; a SQLite file must exist and, like any database, hold MLflow's tables
    (another program's database is refused, never taken over). Nothing is created or written.
    """
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    where = f"set {uri.key}= to the store search.run logged to"
    if uri.is_http:
        check_tracking(uri, advice=f" Or {where}.")  # one quick request: creates nothing there
        return
    _refuse_file_store(uri, f" To read a model, {where}.")
    database = uri.sqlite_file
    if database is not None and not database.is_file():
        default = " (the default)" if uri.is_default else ""
        raise SearchError(f"{uri.key}={uri}{default}: no such MLflow store ({database} does not "
                          f"exist); {where}.")
    tables = set(table_names(uri) or ())
    if not MLFLOW_TABLES <= tables:
        held = (f"holds tables that are not MLflow's ({', '.join(sorted(tables)[:4])}, ...)"
                if tables else "holds no tables")
        raise SearchError(f"{uri.key}={uri}: not an MLflow store (the database {held}); {where}.")


def refuse_deleted(experiment: Any, uri: StoreUrl) -> None:
    """A deleted experiment keeps its name: MLflow would refuse every run logged to it."""
    if experiment.lifecycle_stage != "active":
        raise SearchError(
            f"study_name={experiment.name}: the MLflow experiment '{experiment.name}' in "
            f"{uri} is deleted. Restore it (mlflow experiments restore --experiment-id "
            f"{experiment.experiment_id}), purge it (mlflow gc), use another study_name, or add "
            "tracking_uri=none.")
