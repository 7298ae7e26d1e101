"""The fixtures the tests share: a SQLite storage, the fake data set, and real `mlflow` and
PostgreSQL servers for the tests that ask for one. Helpers the tests import are in helpers.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import MlflowServer

from benchmarks.postgres_server import PostgresServer, binaries
from search.training.images import SearchData, load_search_data

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


@pytest.fixture(scope="session")
def fake_data() -> SearchData:
    """The fake data set's train and validation splits, cut as a cnn3 search cuts them (the data
    set's 256 validation images, seed 0). Loaded once; the tests only read it."""
    return load_search_data("fake", "data", val_size=None, seed=0)


@pytest.fixture(scope="session")
def mlflow_server_process(tmp_path_factory) -> Iterator[MlflowServer]:
    """A real `mlflow server`, started once for the tests that ask for it; a test may stop it
    and start it again (an outage), on the same port and store."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(mlflow_server_process) -> str:
    """The server's URL (up again, should a test have stopped it)."""
    if mlflow_server_process.process.poll() is not None:
        mlflow_server_process.start()
    return mlflow_server_process.url


# ---------------------------------------------------------------- a real PostgreSQL server

@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server (Debian's binaries, initdb in a temp folder, a loopback
    port), ready once pg_isready says so; skipped where PostgreSQL is not installed."""
    if binaries() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture
def pg_databases(postgres, request) -> tuple[str, str]:
    """Fresh Optuna and MLflow databases on the server, for one test."""
    stem = "".join(c for c in request.node.name.lower() if c.isalnum())[-40:]
    return (postgres.url(postgres.create_database(f"optuna_{stem}")),
            postgres.url(postgres.create_database(f"mlflow_{stem}")))
