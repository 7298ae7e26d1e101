"""A throwaway PostgreSQL server for the tests and the storage benchmark: Debian's `postgresql`
binaries, `initdb` in a temporary folder, a free loopback port, a password for `search`.

PostgreSQL refuses to run as root, so as root (CI) the server runs as the `postgres` system user
that Debian's package creates; as anyone else it runs as that user. `start` returns once
`pg_isready` says the server accepts connections (not after a sleep).

    server = PostgresServer.start()
    url = server.url(server.create_database("optuna"))   # postgresql://search:...@127.0.0.1:N/optuna
    ...
    server.stop()
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "search"
PASSWORD = "pg-secret-7f3a9c"  # a throwaway server's; the credential tests look for it


def binaries() -> Path | None:
    """Debian's PostgreSQL binaries (/usr/lib/postgresql/N/bin), the newest; None if absent."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    def __init__(self, folder: Path, port: int, bin_dir: Path) -> None:
        self.folder, self.port, self.bin = folder, port, bin_dir

    @classmethod
    def start(cls, timeout: float = 60) -> PostgresServer:
        bin_dir = binaries()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        folder = Path(tempfile.mkdtemp(prefix="search-pg-"))
        server = cls(folder, _free_port(), bin_dir)
        (folder / "pw").write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
            shutil.chown(folder / "pw", "postgres", "postgres")
        server._as_owner([str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", USER,
                          "--pwfile", str(folder / "pw"), "--auth-local=trust",
                          "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"])
        server._as_owner([str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-l",
                          str(folder / "server.log"), "-w", "-t", str(int(timeout)), "-o",
                          f"-p {server.port} -k {folder} -c listen_addresses=127.0.0.1 "
                          "-c fsync=off -c max_connections=200", "start"])
        server.wait_ready(timeout)
        return server

    def _as_owner(self, command: list[str]) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run([*prefix, *command], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {done.stdout}{done.stderr}")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p",
                                    str(self.port), "-U", USER], capture_output=True)
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not become ready in {timeout:.0f} s:\n"
                           f"{(self.folder / 'server.log').read_text()}")

    def url(self, database: str = "postgres", *, password: bool = True) -> str:
        secret = f":{PASSWORD}" if password else ""
        return f"postgresql://{USER}{secret}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return name

    def stop(self) -> None:
        try:
            self._as_owner([str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m",
                            "immediate", "-w", "stop"])
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
