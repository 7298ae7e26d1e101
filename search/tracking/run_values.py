"""The values every MLflow run of the package records the same way: times in milliseconds,
parameters as strings, and the commit of the code that ran."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

GIT_COMMIT_TAG = "mlflow.source.git.commit"


def now_ms() -> int:
    return int(time.time() * 1000)


def param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def git_commit() -> str | None:
    """The project's commit when it runs from a git checkout (not from an installed copy)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip() if done.returncode == 0 else ""
    return commit or None
