"""Database URLs as the Optuna storage and the MLflow tracking store use them: the file a SQLite
URL names, whether a folder can be written, passwords hidden from everything shown or stored,
PostgreSQL's driver, and a lock that every process using the same database respects.

The lock (`DatabaseLock`) is what keeps several processes, on one machine or many, from racing:
creating a new database's tables, and reserving the study's next trial. On PostgreSQL it is an
advisory lock (held by a connection, so a killed process releases it); on SQLite, whose file
every user shares a machine with, a file lock beside the database.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import sqlite3
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy

from search.config.errors import SearchError


def parse(url: str, key: str = "storage") -> sqlalchemy.engine.URL:
    try:
        return sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise SearchError(f"{key}={masked(url)!r}: not a storage URL; write e.g. "
                          "sqlite:///mlruns/optuna.db or postgresql://user@host/db.") from None


def masked(url: str) -> str:
    """The URL with its password replaced by ***, for anything printed, logged or stored."""
    with contextlib.suppress(Exception):
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    return url


def backend(url: str) -> str:
    """`sqlite`, `postgresql`, `mysql`, ... (`http` for a tracking server, `none`)."""
    scheme = url.split(":", 1)[0].lower()
    return scheme.split("+", 1)[0]


def sqlite_path(url: str, key: str = "storage") -> Path | None:
    """The database file of a SQLite URL; None for any other kind of store."""
    if backend(url) != "sqlite":
        return None
    database = parse(url, key).database
    if database in (None, "", ":memory:") or database.startswith("file::memory:"):
        raise SearchError(f"{key}={masked(url)}: names no database file (an in-memory database keeps no "
                          "study); write e.g. sqlite:///mlruns/optuna.db.")
    return Path(database).expanduser()


def check_driver(url: str, key: str) -> None:
    """A PostgreSQL URL needs its driver, which the `postgres` extra installs."""
    if backend(url) == "postgresql" and not any(
            importlib.util.find_spec(name) for name in ("psycopg", "psycopg2")):
        raise SearchError(f"{key}={masked(url)}: PostgreSQL needs a driver, which is not "
                          "installed: pip install -e \".[postgres]\" (psycopg 3).")


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
        raise SearchError(f"{key}={masked(value)}: cannot write {where} "
                          f"({error.strerror or error}). Make it writable, or point {key}= "
                          "somewhere that is.") from None


def write_ahead_log(connection: sqlite3.Connection) -> None:
    """Puts a SQLite file in write-ahead-log mode: a commit then costs no disk sync, and readers
    (the dashboard, other workers) do not block a writer. The mode is kept in the file."""
    with contextlib.suppress(sqlite3.OperationalError):  # busy in another process: only speed
        connection.execute("PRAGMA journal_mode=WAL")


@functools.cache
def _engine(url: str) -> sqlalchemy.engine.Engine:
    return sqlalchemy.create_engine(url, pool_pre_ping=True, pool_size=1, max_overflow=2)


class DatabaseLock:
    """An exclusive lock named `name` among all processes using the database at `url`, held
    from construction until `release` (or the end of a `with` block)."""

    def __init__(self, url: str, name: str) -> None:
        self._file = self._connection = None
        path = sqlite_path(url) if backend(url) == "sqlite" else None
        if path is not None:
            digest = hashlib.sha1(name.encode()).hexdigest()[:12]
            self._file = open(path.with_name(f"{path.name}.{digest}.lock"), "a")  # noqa: SIM115
            fcntl.flock(self._file, fcntl.LOCK_EX)
        elif backend(url) == "postgresql":
            self._connection = _engine(url).connect()
            self._key = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)
            self._connection.exec_driver_sql(f"SELECT pg_advisory_lock({self._key})")

    def __enter__(self) -> DatabaseLock:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def release(self) -> None:
        if self._file is not None and not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
        if self._connection is not None and not self._connection.closed:
            with contextlib.suppress(Exception):  # a lost connection has released it already
                self._connection.exec_driver_sql(f"SELECT pg_advisory_unlock({self._key})")
            self._connection.close()
