"""What a storage URL leads to beyond Optuna's own tables: the lock that every process using the
same database respects, SQLite's write-ahead log, and the artifact store beside the storage.

The lock (`DatabaseLock`) keeps several processes, on one machine or many, from racing while they
create a new database's tables or reserve the study's next trial. On PostgreSQL it is an
advisory lock (held by a connection, so a killed process releases it); on SQLite a file lock in
one folder for every database (`StoreUrl.lock_file`), never beside the user's file, and removed
when released.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sqlite3
from pathlib import Path

import sqlalchemy
from optuna.artifacts import FileSystemArtifactStore

from search.config.urls import StoreUrl


def write_ahead_log(connection: sqlite3.Connection) -> None:
    """Puts a SQLite file in write-ahead-log mode: a commit then costs no disk sync, and readers
    (the dashboard, other workers) do not block a writer. The mode is kept in the file."""
    with contextlib.suppress(sqlite3.OperationalError):  # busy in another process: only speed
        connection.execute("PRAGMA journal_mode=WAL")


def artifact_store(url: StoreUrl) -> FileSystemArtifactStore:
    """Optuna's artifact store of a storage (checkpoints, learning curves, trial configs)."""
    url.artifact_dir.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(url.artifact_dir)


@functools.cache
def _engine(raw_url: str) -> sqlalchemy.engine.Engine:
    return sqlalchemy.create_engine(raw_url, pool_pre_ping=True, pool_size=1, max_overflow=2)


def _lock_file(path: Path) -> int:
    """An open, exclusively locked lock file at `path`. A holder removes the file before it
    unlocks, so a waiter that wakes on a removed file tries again on the path's new file."""
    if not path.parent.is_dir():
        with contextlib.suppress(FileExistsError):
            path.parent.mkdir(parents=True)
            path.parent.chmod(0o1777)  # every user's processes lock here, as in /tmp
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)


class DatabaseLock:
    """An exclusive lock named `name` among all processes using the database at `url`, held
    from construction until `release` (or the end of a `with` block). A store that is neither
    SQLite nor PostgreSQL (an MLflow server) needs none: the lock is then a no-op."""

    def __init__(self, url: StoreUrl, name: str) -> None:
        self._descriptor: int | None = None
        self._connection = None
        if url.backend == "sqlite":
            self._path = url.lock_file(name)
            self._descriptor = _lock_file(self._path)
        elif url.backend == "postgresql":
            self._key = url.lock_key(name)
            self._connection = _engine(url.raw).connect()
            try:
                self._connection.exec_driver_sql(f"SELECT pg_advisory_lock({self._key})")
            except BaseException:  # a failed or interrupted wait: the connection goes back
                self._connection.close()
                raise

    def __enter__(self) -> DatabaseLock:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def release(self) -> None:
        if self._descriptor is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)  # while still held: see _lock_file
            os.close(self._descriptor)  # closing unlocks
            self._descriptor = None
        if self._connection is not None and not self._connection.closed:
            with contextlib.suppress(Exception):  # a lost connection has released it already
                self._connection.exec_driver_sql(f"SELECT pg_advisory_unlock({self._key})")
            self._connection.close()
