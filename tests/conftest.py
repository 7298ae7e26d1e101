"""Shared helpers: run the real CLI in a subprocess on tiny data, read a study back, and a real
`mlflow server` for the tests that ask for one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
import torch
from threadpoolctl import threadpool_limits

from benchmarks.postgres_server import PostgresServer, binaries

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# A cnn3 of 8 channels and 3x3 kernels: a trial of a few epochs on `dataset=fake` takes about a
# second on a CPU.
SMALL_CNN = [
    "space.batch_size.choices=[128]", "space.hidden_1.choices=[16]", "space.hidden_2.choices=[0]",
    *[f"space.width_{i}.choices=[8]" for i in (1, 2, 3)],
    *[f"space.kernel_size_{i}.choices=[3]" for i in (1, 2, 3)],
]
# A cnn3 space small enough that a 3-epoch trial on `dataset=fake` takes well under a second.
TINY = [
    "dataset=fake", "tracking_uri=none", "device=cpu",
    "space.width_1.choices=[8]", "space.width_2.choices=[8]", "space.width_3.choices=[16]",
    "space.hidden_1.choices=[32]", "space.hidden_2.choices=[0]", "space.batch_size.choices=[128]",
    "space.kernel_size_1.choices=[3,5]", "space.kernel_size_2.choices=[3]",
    "space.kernel_size_3.choices=[3]",
]


def cli_env() -> dict[str, str]:
    # One thread: on a small shared machine, OpenMP threads spinning against other processes
    # make a tiny model several times slower, not faster.
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_cli(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env or cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 200) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run_cli(module: str, *args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return finish(start_cli(module, *args, cwd=cwd), timeout=timeout)


def load(storage: str, name: str = "cnn3") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


@contextmanager
def one_thread() -> Iterator[None]:
    """In-process equivalent of OMP_NUM_THREADS=1 (torch and scikit-learn), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


# ---------------------------------------------------------------- a real mlflow server

def wait_for_health(url: str, process: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    """Returns once GET /health answers (about 15 s on an idle machine, more on a busy one)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"mlflow server did not answer /health within {seconds:.0f} s:\n{log.read_text()}")


class MlflowServer:
    """`mlflow server` on a SQLite file and a free loopback port; can be stopped and started
    again on the same port and store (an outage)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.folder / "server.log"
        # Job execution (a second process) is not needed to log runs; off, the server starts faster.
        env = dict(cli_env(), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(log, "a") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                 f"sqlite:///{self.folder / 'mlflow.db'}", "--default-artifact-root",
                 str(self.folder / "art"), "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1"],
                stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_for_health(self.url, self.process, log)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


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
