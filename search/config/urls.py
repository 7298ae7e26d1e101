"""Database URLs as given to `storage=` and `tracking_uri=`, parsed once into a `StoreUrl`.

Every module that reads a URL asks this value (its backend, its SQLite file, its artifact
folder, where its lock lives) instead of reading the string by rules of its own, so
`sqlite+pysqlite:///x.db` is the same file everywhere. `str(url)` is the URL with its password
masked: whatever is printed, logged or stored shows that form, and only the code that connects
reads `url.raw`.

Example:
    >>> url = StoreUrl("postgresql://search:secret@db/optuna")
    >>> str(url), url.backend, url.sqlite_file
    ('postgresql://search:***@db/optuna', 'postgresql', None)
    >>> StoreUrl("sqlite+pysqlite:///runs/o.db").artifact_dir
    PosixPath('runs/optuna-artifacts')
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy

from search.config.errors import SearchError

DEFAULTS = {"storage": "sqlite:///mlruns/optuna.db", "tracking_uri": "sqlite:///mlruns/mlflow.db"}
# Where a URL comes from when the command line gives none (credentials stay out of shell history).
ENVIRONMENT = {"storage": "SEARCH_STORAGE", "tracking_uri": "MLFLOW_TRACKING_URI"}
ARTIFACT_DIR_NAME = "optuna-artifacts"  # Optuna's artifacts (checkpoints, dashboard files)
# A storage on a database server has no folder of its own: its artifacts go under ./mlruns.
SERVER_ARTIFACT_DIR = Path("mlruns") / ARTIFACT_DIR_NAME
# SQLite lock files live here, one folder for every database, and are removed when released.
LOCK_DIR = Path(tempfile.gettempdir()) / "search-locks"


# How to install the driver a database kind lacks (SQLAlchemy's default driver of each kind).
DRIVER_HINTS = {
    "postgresql": 'pip install -e ".[postgres]" (psycopg 3)',
    "mysql": "pip install mysqlclient, or write mysql+pymysql:// after pip install pymysql",
    "mariadb": "pip install mysqlclient, or write mariadb+pymysql:// after pip install pymysql",
    "oracle": "pip install oracledb",
    "mssql": "pip install pyodbc",
}

# MLflow's own addresses of a logged or registered model: `models:/cnn3-best/1`,
# `models:/cnn3-best@champion`, `runs:/<run_id>/model`.
MODEL_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def store_url(key: str, given: str | None) -> StoreUrl:
    """`storage=` / `tracking_uri=` as given, else from its environment variable, else the default."""
    return StoreUrl(given or os.environ.get(ENVIRONMENT[key]) or DEFAULTS[key], key)


def is_model_uri(text: str) -> bool:
    return text.startswith(MODEL_URI_SCHEMES)


# `scheme://user:password@` anywhere in a text: the password runs to the last `@` before the
# host's end (`/` or a space), as urlsplit reads a netloc.
_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@]*):[^\s/]*@")


def masked(text: str) -> str:
    """A URL, or any text quoting URLs (an error message, two values of one key), with every
    password replaced by ***."""
    return _PASSWORD.sub(r"\1:***@", text)


@dataclass(frozen=True)
class StoreUrl:
    """A storage or tracking URL.

    Attributes:
        raw: The URL as given, password included: for the database driver only, never shown.
        key: The setting it came from (`storage`, `tracking_uri`), named in every message.
    """

    raw: str
    key: str = "storage"

    def __str__(self) -> str:
        return masked(self.raw)

    def __repr__(self) -> str:
        return f"StoreUrl({str(self)!r}, key={self.key!r})"

    @property
    def backend(self) -> str:
        """`sqlite`, `postgresql`, `mysql`, ... (`http` for a tracking server, `none`)."""
        scheme = self.raw.split(":", 1)[0].lower().split("+", 1)[0]
        return "http" if scheme == "https" else scheme

    @property
    def is_default(self) -> bool:
        return self.raw == DEFAULTS.get(self.key)

    @property
    def is_off(self) -> bool:
        """`tracking_uri=none`: no MLflow logging."""
        return self.raw.strip().lower() == "none"

    @property
    def is_http(self) -> bool:
        return self.raw.startswith(("http://", "https://"))

    @functools.cached_property
    def parsed(self) -> sqlalchemy.engine.URL:
        try:
            return sqlalchemy.engine.make_url(self.raw)
        except sqlalchemy.exc.ArgumentError:
            raise SearchError(f"{self.key}={self}: not a database URL; write e.g. "
                              f"{DEFAULTS['storage']} or postgresql://user@host/db.") from None

    @functools.cached_property
    def sqlite_file(self) -> Path | None:
        """The database file of a SQLite URL; None for any other kind of store."""
        if self.backend != "sqlite":
            return None
        database = self.parsed.database
        if database in (None, "", ":memory:") or database.startswith("file::memory:"):
            raise SearchError(f"{self.key}={self}: names no database file (an in-memory database "
                              f"keeps no study); write e.g. {DEFAULTS[self.key]}.")
        return Path(database).expanduser()

    @property
    def artifact_dir(self) -> Path:
        """Optuna's artifact folder of this storage: beside a SQLite file (so the default keeps
        everything under mlruns/), else mlruns/optuna-artifacts under the working directory."""
        database = self.sqlite_file
        return database.parent / ARTIFACT_DIR_NAME if database else SERVER_ARTIFACT_DIR

    def lock_file(self, name: str) -> Path:
        """Where a SQLite database's lock `name` lives: one folder for every database on this
        machine (never beside a user's file), named after the file's real path."""
        identity = f"{self.sqlite_file.resolve()}\0{name}".encode()
        return LOCK_DIR / f"{hashlib.sha1(identity).hexdigest()[:20]}.lock"

    @staticmethod
    def lock_key(name: str) -> int:
        """The PostgreSQL advisory-lock key of lock `name` (advisory locks are per database)."""
        return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)

    def check_driver(self) -> None:
        """The URL's database kind must be one SQLAlchemy knows, with its driver installed:
        a missing driver (`mysql://` without MySQLdb) is a message, not a ModuleNotFoundError."""
        if self.is_http or self.is_off:
            return
        try:
            dialect = self.parsed.get_dialect()
        except sqlalchemy.exc.NoSuchModuleError:
            raise SearchError(f"{self.key}={self}: unknown database kind '{self.parsed.drivername}'"
                              "; write e.g. sqlite:///path.db or postgresql://user@host/db.") from None
        try:
            dialect.import_dbapi()
        except ImportError as error:
            module = error.name or str(error)
            install = DRIVER_HINTS.get(self.backend, f"pip install the package that provides "
                                                     f"the module {module}")
            raise SearchError(f"{self.key}={self}: {self.backend} needs its driver {module}, "
                              f"which is not installed: {install}.") from None


def check_writable(folder: Path, key: str, value: object, file: Path | None = None) -> None:
    """Fails with a message when `folder` (and `file`, if it exists) cannot be written, found by
    trying: permission bits (which root ignores) and read-only mounts fail alike. `value` is
    what the message quotes (a `StoreUrl` quotes itself masked)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
        if file is not None and file.exists():
            with open(file, "r+b"):
                pass
    except OSError as error:
        where = file if file is not None and file.exists() and folder.is_dir() else folder
        raise SearchError(f"{key}={masked(str(value))}: cannot write {where} "
                          f"({error.strerror or error}). Make it writable, or point {key}= "
                          "somewhere that is.") from None


def writable_folder(folder: Path, key: str = "out") -> None:
    """Creates `folder` or refuses `key=` at once, before hours of retraining."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SearchError(f"{key}={folder}: cannot create the folder ({error.strerror or error});"
                          f" point {key}= at a folder that can be written.") from None
    check_writable(folder, key, str(folder))
