"""Where a person opens a study's runs in the MLflow UI: the link, and the command that serves
the UI for a database store. Needs no MLflow import (the summary and the dashboard note print it).
"""

from __future__ import annotations

from search.config.urls import StoreUrl

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def runs_link(base_url: str, experiment_id: str) -> str:
    """The MLflow UI's page of an experiment's runs, in its model-training mode.

    MLflow 3.17's UI keeps a GenAI / model-training mode per browser, GenAI unless the user
    switched, and opens an experiment on the GenAI overview (traces, token usage) whatever the
    experiment's tags say; `workflowType=machine_learning` in the link switches the mode.

    Example:
        >>> runs_link("http://127.0.0.1:5000/", "1")
        'http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning'
    """
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_access(tracking_uri: StoreUrl, experiment_id: str) -> tuple[str | None, str]:
    """How a person opens a study's runs: the command that serves the UI (None for an
    `mlflow server`, which serves it already) and the link to open, password masked in both."""
    if tracking_uri.is_http:
        return None, runs_link(str(tracking_uri), experiment_id)
    return f"mlflow ui --backend-store-uri {tracking_uri}", runs_link(LOCAL_UI, experiment_id)
