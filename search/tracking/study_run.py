"""The study in MLflow: its experiment and its parent run, as one process writes to them.

The layout a user finds in the MLflow UI:

- one experiment per study, named after `study_name`;
- one parent run per study (`study-cnn3`, tag `search.role=study`) holding the resolved config
  (`config.yaml`) and the best value/params so far; resuming the study finds it again through the
  study's user attribute `mlflow_parent_run_id`, so it is never duplicated;
- one child run per trial (`trial-0007`, tag `mlflow.parentRunId`), written from the trial in the
  Optuna storage by `search.tracking.trial_runs` (live per-epoch metrics: `search.tracking.live`).

Everything goes through `MlflowClient` with explicit run ids and batched writes, never through the
fluent `mlflow.start_run` stack: that stack is per-process global state, wrong as soon as trials
run in several threads or worker processes at once. The final models (`model_registry`) are the
only place the fluent API is used.

Example (what `search.runner.process` does)::

    check_tracking(config.tracking_uri)          # SearchError before any trial if unreachable
    study_run = ParentRun(config)                 # finds or creates the experiment
    logger = TrialLogger(study_run)              # one run per trial of this process
    objective = Objective(config, data, device, observers=[logger])
    study.optimize(objective, ...)
    logger.close()                               # prints the logging cost
    end_study(study_run, study, interrupted=False)  # only the process that ends the study
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import optuna
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from search.config.errors import SearchError
from search.config.settings import StudyConfig, to_yaml
from search.config.urls import StoreUrl, masked
from search.storage.backends import DatabaseLock, write_ahead_log
from search.storage.trials import StudyAttr, TrialAttr
from search.tracking.run_values import GIT_COMMIT_TAG, git_commit, now_ms, param_value
from search.tracking.stores import refuse_deleted, short_reason

# What the experiment holds, for MLflow. (MLflow 3.17's UI does not read it to pick its GenAI or
# model-training mode, which it keeps per browser: `ui_links.runs_link` sets that mode.)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
ROLE_TAG = "search.role"                  # "study" on the parent run, "trial" on child runs
PARENT_TAG = "mlflow.parentRunId"         # what makes the MLflow UI nest a run under another
# A parent run created this long before the study's first trial belongs to an older study of the
# same name (e.g. one whose Optuna storage was deleted); allows for clocks of several machines.
CLOCK_SLACK_MS = 60_000
# Settings for calls to a tracking server during a study (a user's own values win): MLflow's
# default retries last minutes, which would stall every trial once the server is gone; and the
# "View run at" line it prints for every finished run costs a request and floods the trial lines.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
# After a failed call, logging pauses this long (then the next, ...) before it tries again; what
# is not logged meanwhile is backfilled from the Optuna storage (`trial_runs.backfill`).
BACKOFF_SECONDS = (5, 15, 60, 300)


def artifact_location(uri: StoreUrl, experiment_name: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a SQLite store's file (so the default
    store keeps everything under `mlruns/`); the server decides for an http:// URI."""
    database = uri.sqlite_file
    if database is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment_name) or "study"
    return str(database.resolve().parent / "artifacts" / safe)


def open_experiment(config: StudyConfig,
                    client: MlflowClient | None = None) -> tuple[MlflowClient, str]:
    """A client of the study's tracking store and the id of the study's experiment: found by
    name, else created (artifact location, tags) the one way every writer creates it, the search
    or a final evaluation of a study that ran without tracking.

    Raises:
        SearchError: the experiment is deleted, or the store refuses to open it.
    """
    if config.tracking_uri.is_http:
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    database = config.tracking_uri.sqlite_file
    try:
        # Opening a new store creates its tables: one process at a time, or two processes
        # starting at once both run MLflow's migrations and one fails.
        with DatabaseLock(config.tracking_uri, "mlflow-schema"):
            if database is not None:  # each run's and metric's commit then skips disk syncs
                with contextlib.closing(sqlite3.connect(database)) as connection:
                    write_ahead_log(connection)
            client = client or MlflowClient(config.tracking_uri.raw)
            return client, _experiment_id(client, config)
    except SearchError:
        raise
    except Exception as error:  # noqa: BLE001 - a server that refuses us, a broken file
        raise SearchError(f"tracking_uri={config.tracking_uri}: cannot open the "
                          f"experiment '{config.study_name}' ({masked(short_reason(error))}). Add "
                          "tracking_uri=none to run without MLflow logging.") from None


def _experiment_id(client: MlflowClient, config: StudyConfig) -> str:
    name = config.study_name
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location(config.tracking_uri, name),
                tags={"study_name": name, "model": config.model, "dataset": config.dataset,
                      **EXPERIMENT_KIND})
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":  # another process won the race
                raise
            experiment = client.get_experiment_by_name(name)
    refuse_deleted(experiment, config.tracking_uri)
    if any(experiment.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):
        for key, value in EXPERIMENT_KIND.items():  # an experiment made before the tag
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


class ParentRun:
    """The study's MLflow experiment and its parent run, as one process sees them.

    Every process of a study (the main one, each worker) has one, to nest its trial runs under
    the parent; only the process that ends the study closes the parent (`close_parent`, through
    `trial_runs.end_study`).

    Logging must never cost a study its trials: once the tracking URI was checked, a failing call
    (here, in `trial_runs` or in a `TrialLogger` sharing this object) prints a warning and pauses
    logging (`guard`). Time spent logging is added up in `seconds`.

    Args:
        config: the study's config; `tracking_uri` must be enabled and reachable
            (`check_tracking`).
        client: an `MlflowClient` to use instead of one built from `config.tracking_uri`.

    Raises:
        SearchError: the study's experiment exists in the tracking store but is deleted, or the
            store refuses to open it.
    """

    def __init__(self, config: StudyConfig, client: MlflowClient | None = None) -> None:
        if not config.tracking_enabled:
            raise ValueError(f"tracking_uri={config.tracking_uri}: tracking is off.")
        started = time.perf_counter()
        self.config = config
        self.seconds = 0.0
        self._failures, self._paused_until = 0, 0.0
        self.client, self.experiment_id = open_experiment(config, client)
        self.parent_run_id: str | None = None
        self.commit = git_commit()
        self.setup_seconds = time.perf_counter() - started
        self._lock = threading.Lock()

    def available(self) -> bool:
        """False while logging pauses after a failure (see `BACKOFF_SECONDS`)."""
        return time.monotonic() >= self._paused_until

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Times a logging step and keeps a failing tracking store from failing the study: a
        failure pauses logging, with growing pauses, and the study goes on."""
        started = time.perf_counter()
        try:
            yield
        except Exception as error:  # noqa: BLE001 - any logging failure: warn, pause, go on
            pause = BACKOFF_SECONDS[min(self._failures, len(BACKOFF_SECONDS) - 1)]
            self._failures += 1
            self._paused_until = time.monotonic() + pause
            print(f"warning: MLflow logging failed while {what} ({masked(short_reason(error))}); "
                  f"trying again in {pause} s. The study goes on; what is not logged meanwhile "
                  "is backfilled from the study at its end (or by python -m search.sync).",
                  file=sys.stderr, flush=True)
        else:
            self._failures = 0
        finally:
            self.seconds += time.perf_counter() - started

    def parent_for(self, study: optuna.Study, running: bool = True) -> str:
        """The study's parent run: linked from the study, else found by tags, else created;
        marked RUNNING (with the config as config.yaml) when this process runs trials.

        Two workers starting a new study at once may both create one; each then keeps the
        oldest and deletes its own if it lost, so they agree on a single parent.
        """
        with self._lock:
            if self.parent_run_id is None:
                self.parent_run_id = self._find_parent(study) or self._create_parent(study)
                if running:
                    self.client.update_run(self.parent_run_id, status="RUNNING")
                    self.client.log_text(self.parent_run_id, to_yaml(self.config), "config.yaml")
            return self.parent_run_id

    def _active_run(self, run_id: str | None):
        if not run_id:
            return None
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        ok = run.info.lifecycle_stage == "active" and run.info.experiment_id == self.experiment_id
        return run if ok else None

    def _parent_candidates(self, study: optuna.Study) -> list:
        """Parent runs of this study by tags, oldest first (ties broken by run id)."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'study'", max_results=1000)
        first_start = min((t.datetime_start for t in study.get_trials(deepcopy=False)
                           if t.datetime_start is not None), default=None)
        earliest = (first_start.timestamp() * 1000 - CLOCK_SLACK_MS) if first_start else 0
        mine = [r for r in runs
                if r.data.tags.get("study_name") == study.study_name
                and r.data.tags.get("optuna_storage") == str(self.config.storage)
                and r.info.start_time >= earliest]
        return sorted(mine, key=lambda r: (r.info.start_time, r.info.run_id))

    def _find_parent(self, study: optuna.Study) -> str | None:
        linked = self._active_run(study.user_attrs.get(StudyAttr.MLFLOW_PARENT_RUN_ID))
        if linked is not None:
            return linked.info.run_id
        candidates = self._parent_candidates(study)
        if not candidates:
            return None
        study.set_user_attr(StudyAttr.MLFLOW_PARENT_RUN_ID, candidates[0].info.run_id)
        return candidates[0].info.run_id

    def _create_parent(self, study: optuna.Study) -> str:
        config = self.config
        tags = {ROLE_TAG: "study", "study_name": study.study_name,
                "optuna_storage": str(config.storage),
                "model": config.model, "dataset": config.dataset,
                "fingerprint": config.fingerprint(), "mlflow.source.name": "search.run"}
        if self.commit:
            tags[GIT_COMMIT_TAG] = self.commit
        run = self.client.create_run(self.experiment_id, run_name=f"study-{study.study_name}",
                                     tags=tags)
        mine = run.info.run_id
        params = {"model": config.model, "dataset": config.dataset, "epochs": config.epochs,
                  "seed": config.seed, "sampler": config.sampler.name,
                  "pruner": config.pruner.name}
        self.client.log_batch(mine, params=[Param(k, param_value(v)) for k, v in params.items()])
        candidates = self._parent_candidates(study)
        winner = candidates[0].info.run_id if candidates else mine
        if winner != mine:
            self.client.delete_run(mine)
        study.set_user_attr(StudyAttr.MLFLOW_PARENT_RUN_ID, winner)
        return winner

    def log_best(self, number: int, value: float, params: dict[str, Any], run_id: str,
                 step: int) -> None:
        tags = [RunTag("best_trial", str(number)), RunTag("best_run_id", run_id or ""),
                RunTag("best_params", json.dumps(params, sort_keys=True, default=str)[:5000])]
        self.client.log_batch(self.parent_run_id, tags=tags,
                              metrics=[Metric("best_val_accuracy", float(value), now_ms(), step)])

    def close_parent(self, study: optuna.Study, status: str) -> None:
        """Trial counts and the final best on the parent run, then its status."""
        parent = self.parent_for(study, running=False)
        trials = study.get_trials(deepcopy=False)
        counts = {s: sum(t.state == s for t in trials) for s in TrialState}
        self.client.log_batch(parent, tags=[
            RunTag(f"n_{s.name.lower()}", str(n)) for s, n in counts.items()
            if s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)])
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if complete:
            best = max(complete, key=lambda t: t.value)
            self.log_best(best.number, best.value, best.params,
                          best.user_attrs.get(TrialAttr.MLFLOW_RUN_ID, ""), step=trials[-1].number)
        self.client.set_terminated(parent, status)
