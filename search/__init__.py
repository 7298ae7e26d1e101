"""Hyperparameter searches for image classifiers with Optuna, tracked in MLflow.

The Python API (`search.api`, documented there, in the README and in docs/models.md) is
importable from here:
`search.run_study`, `search.open_study`, `search.best_config`, `search.retrain`,
`search.load_model`, `search.predict`. It is loaded on first use, so that
`python -m search.run --help` does not pay for PyTorch and MLflow.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Prediction", "RetrainedModel", "SearchError", "Study", "best_config", "load_model",
           "open_study", "predict", "retrain", "run_study"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from search import api

        return getattr(api, name)
    raise AttributeError(f"module 'search' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
