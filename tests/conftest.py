"""Shared helpers: run the real CLI in a subprocess on tiny data, and read a study back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# A cnn3 space small enough that a 3-epoch trial on `dataset=fake` takes well under a second.
TINY = [
    "dataset=fake", "tracking_uri=none", "device=cpu",
    "space.width_1.choices=[8]", "space.width_2.choices=[8]", "space.width_3.choices=[16]",
    "space.hidden_1.choices=[32]", "space.hidden_2.choices=[0]", "space.batch_size.choices=[128]",
    "space.kernel_size_1.choices=[3,5]", "space.kernel_size_2.choices=[3]",
    "space.kernel_size_3.choices=[3]",
]


def cli_env() -> dict[str, str]:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(module: str, *args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def load(storage: str, name: str = "cnn3") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


@pytest.fixture
def storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"
