"""MLflow tracking: every trial of a study as an MLflow run, nested under one run per study.

The layout a user finds in the MLflow UI:

- one experiment per study, named after `study_name`;
- one parent run per study (`study-cnn3`, tag `search.role=study`) holding the resolved config
  (`config.yaml`) and the best value/params so far; resuming the study finds it again through the
  study's user attribute `mlflow_parent_run_id`, so it is never duplicated;
- one child run per trial (`trial-0007`, tag `mlflow.parentRunId`) with every parameter (sampled
  and fixed), per-epoch metrics at `step=epoch`, final metrics, tags and a status that mirrors the
  Optuna state (FINISHED / KILLED / FAILED for complete / pruned / failed).

Either side leads to the other: the Optuna trial stores the run id (user attribute
`mlflow_run_id`), the run stores the trial number (tag `trial_number`).

Everything goes through `MlflowClient` with explicit run ids and batched writes, never through the
fluent `mlflow.start_run` stack: that stack is per-process global state, wrong as soon as trials
run in several threads or worker processes at once. The final models (`model_registry`) are the
only other place MLflow is used.

Example (what `search.runner.process` does)::

    check_tracking(config.tracking_uri)          # SearchError before any trial if unreachable
    study_run = ParentRun(config)                 # finds or creates the experiment
    logger = TrialLogger(study_run)              # one run per trial of this process
    objective = Objective(config, data, device, observers=[logger])
    study.optimize(objective, ...)
    logger.close()                               # prints the logging cost
    study_run.end(study, interrupted=False)      # only the process that ends the study
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import patch
from urllib.parse import urlparse

import optuna
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, TrialState

from search.config.errors import SearchError
from search.config.settings import StudyConfig, to_yaml
from search.config.urls import DEFAULTS, StoreUrl, masked
from search.storage.backends import DatabaseLock, write_ahead_log
from search.storage.checks import check_folder, table_names
from search.storage.trials import StudyAttr, TrialAttr, params_of
from search.training.loop import resolve_device
from search.training.results import EpochMetrics

# What the experiment holds, for MLflow. (MLflow 3.17's UI does not read it to pick its GenAI or
# model-training mode, which it keeps per browser: `runs_link` sets that mode.)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
ROLE_TAG = "search.role"                  # "study" on the parent run, "trial" on child runs
PARENT_TAG = "mlflow.parentRunId"         # what makes the MLflow UI nest a run under another
GIT_COMMIT_TAG = "mlflow.source.git.commit"
RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED",
              TrialState.FAIL: "FAILED"}
# Per-trial facts (from the objective's user attributes) logged once, as final metrics. Their
# names differ from the per-epoch ones so a metric's history stays one value per epoch.
FINAL_METRICS = {TrialAttr.BEST_VAL_ACCURACY: "best_val_accuracy",
                 TrialAttr.BEST_EPOCH: "best_epoch", TrialAttr.EPOCHS_RUN: "epochs_run",
                 TrialAttr.PARAMETER_COUNT: "parameter_count",
                 TrialAttr.TRAIN_SECONDS: "train_seconds",
                 TrialAttr.SECONDS_PER_EPOCH: "mean_epoch_seconds",
                 TrialAttr.IMAGES_PER_SECOND: "mean_images_per_second"}
# A parent run created this long before the study's first trial belongs to an older study of the
# same name (e.g. one whose Optuna storage was deleted); allows for clocks of several machines.
CLOCK_SLACK_MS = 60_000
# Settings for calls to a tracking server during a study (a user's own values win): MLflow's
# default retries last minutes, which would stall every trial once the server is gone; and the
# "View run at" line it prints for every finished run costs a request and floods the trial lines.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
# After a failed call, logging pauses this long (then the next, ...) before it tries again; what
# is not logged meanwhile is backfilled from the Optuna storage (`ParentRun.backfill`).
BACKOFF_SECONDS = (5, 15, 60, 300)
# Tables every MLflow database has: a store without them is not MLflow's (or not one yet).
MLFLOW_TABLES = {"experiments", "runs", "alembic_version"}
OFF_ADVICE = " Add tracking_uri=none to run the study without MLflow logging."


def now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------- checking the tracking URI

def short_reason(error: BaseException) -> str:
    """The part of an MLflow/requests error a person needs, on one line."""
    text = " ".join(str(error).split())
    for marker in ("Connection refused", "Name or service not known", "timed out",
                   "No route to host", "Temporary failure in name resolution"):
        if marker.lower() in text.lower():
            return marker.lower()
    return (text[:300] + "...") if len(text) > 300 else (text or type(error).__name__)


def check_tracking(uri: StoreUrl, experiment: str | None = None, *,
                   advice: str = OFF_ADVICE) -> None:
    """Fails with a `SearchError` when the MLflow tracking store at `uri` cannot be used.

    Called before the study is opened, so an unreachable server stops the run before any trial;
    it writes nothing (a new SQLite store is created on first use, after the study). The default
    SQLite store's folder is created. `advice` ends every refusal (what else the user can do).

    Raises:
        SearchError: the URI is a plain directory (MLflow 3's file store is not supported), its
            folder does not exist or cannot be written, an existing file is not a database, the
            server does not answer, or the study's experiment (`experiment`) is deleted there.
    """
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not "Creating initial tables..."
    _refuse_file_store(uri, advice)
    if not uri.is_http:
        try:
            if uri.sqlite_file is not None:
                check_folder(uri)
            if table_names(uri) is None:
                return  # a new SQLite file: created on first use
        except SearchError as error:
            raise SearchError(f"{error}{advice}") from None
    try:
        # One quick try: no retries, a short timeout (read when the request is made).
        # A database store's first use creates its tables: under the lock that ParentRun takes.
        with patch.dict(os.environ, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                        MLFLOW_HTTP_REQUEST_TIMEOUT="10"), \
                DatabaseLock(uri, "mlflow-schema"):
            client = MlflowClient(uri.raw)
            found = (client.get_experiment_by_name(experiment) if experiment
                     else client.search_experiments(max_results=1) and None)
    except Exception as error:  # noqa: BLE001 - any failure here means "cannot log there"
        hint = (" Start it (e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db "
                "--host 127.0.0.1 --port 5000`) or fix the URL." if uri.is_http else "")
        raise SearchError(f"tracking_uri={uri}: cannot reach the MLflow tracking store "
                          f"({masked(short_reason(error))}).{hint}{advice}") from None
    if found is not None:
        _refuse_deleted(found, uri)


def _refuse_file_store(uri: StoreUrl, advice: str) -> None:
    scheme = urlparse(uri.raw).scheme
    if scheme in ("", "file") or re.fullmatch(r"[A-Za-z]", scheme):  # a path (C:\ on Windows)
        raise SearchError(
            f"{uri.key}={uri}: a directory is MLflow's old file store, which MLflow 3 no longer "
            f"supports. Use a database such as {DEFAULTS['tracking_uri']} (the default) or the "
            "http:// URL of an `mlflow server`." + advice)


def check_existing_tracking(uri: StoreUrl) -> None:
    """Fails with a `SearchError` unless `uri` is an MLflow store that exists already: for the
    commands that only read one (`search.predict`, `search.load_model`), which must never create
    a store. MLflow's client creates and migrates any database it is pointed at, so a typo in
    `tracking_uri=` would become a new, empty store: it is only made once this check passes.
    A server must answer; a SQLite file must exist and, like any database, hold MLflow's tables
    (another program's database is refused, never taken over). Nothing is created or written.
    """
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    where = f"set {uri.key}= to the store search.run logged to"
    if uri.is_http:
        check_tracking(uri, advice=f" Or {where}.")  # one quick request: creates nothing there
        return
    _refuse_file_store(uri, f" To read a model, {where}.")
    database = uri.sqlite_file
    if database is not None and not database.is_file():
        default = " (the default)" if uri.is_default else ""
        raise SearchError(f"{uri.key}={uri}{default}: no such MLflow store ({database} does not "
                          f"exist); {where}.")
    tables = set(table_names(uri) or ())
    if not MLFLOW_TABLES <= tables:
        held = (f"holds tables that are not MLflow's ({', '.join(sorted(tables)[:4])}, ...)"
                if tables else "holds no tables")
        raise SearchError(f"{uri.key}={uri}: not an MLflow store (the database {held}); {where}.")


def _refuse_deleted(experiment: Any, uri: StoreUrl) -> None:
    """A deleted experiment keeps its name: MLflow would refuse every run logged to it."""
    if experiment.lifecycle_stage != "active":
        raise SearchError(
            f"study_name={experiment.name}: the MLflow experiment '{experiment.name}' in "
            f"{uri} is deleted. Restore it (mlflow experiments restore --experiment-id "
            f"{experiment.experiment_id}), purge it (mlflow gc), use another study_name, or add "
            "tracking_uri=none.")


# ---------------------------------------------------------------- facts about this process

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


def artifact_location(uri: StoreUrl, experiment_name: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a SQLite store's file (so the default
    store keeps everything under `mlruns/`); the server decides for an http:// URI."""
    database = uri.sqlite_file
    if database is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment_name) or "study"
    return str(database.resolve().parent / "artifacts" / safe)


def param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


# ---------------------------------------------------------------- opening the MLflow UI

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


# ---------------------------------------------------------------- the study's run

class ParentRun:
    """The study's MLflow experiment and its parent run, as one process sees them.

    Every process of a study (the main one, each worker) has one, to nest its trial runs under
    the parent; only the process that ends the study calls `end`, which closes the parent run.

    Logging must never cost a study its trials: once the tracking URI was checked, a failing call
    (here or in a `TrialLogger` sharing this object) prints one warning and turns logging off for
    the rest of the process. Time spent logging is added up in `seconds`.

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
        if config.tracking_uri.is_http:
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
        started = time.perf_counter()
        self.config = config
        self.seconds = 0.0
        self._failures, self._paused_until = 0, 0.0
        database = config.tracking_uri.sqlite_file
        try:
            # Opening a new store creates its tables: one process at a time, or two processes
            # starting at once both run MLflow's migrations and one fails.
            with DatabaseLock(config.tracking_uri, "mlflow-schema"):
                if database is not None:  # each run's and metric's commit then skips disk syncs
                    with contextlib.closing(sqlite3.connect(database)) as connection:
                        write_ahead_log(connection)
                self.client = client or MlflowClient(config.tracking_uri.raw)
                self.experiment_id = self._experiment_id()
        except Exception as error:  # noqa: BLE001 - a server that refuses us, a broken file
            raise SearchError(f"tracking_uri={config.tracking_uri}: cannot open the "
                              f"experiment '{config.study_name}' ({masked(short_reason(error))}). Add "
                              "tracking_uri=none to run without MLflow logging.") from None
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

    def _experiment_id(self) -> str:
        name = self.config.study_name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(
                    name, artifact_location=artifact_location(self.config.tracking_uri, name),
                    tags={"study_name": name, "model": self.config.model,
                          "dataset": self.config.dataset, **EXPERIMENT_KIND})
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":  # another worker won the race
                    raise
                experiment = self.client.get_experiment_by_name(name)
        _refuse_deleted(experiment, self.config.tracking_uri)
        if any(experiment.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):
            for key, value in EXPERIMENT_KIND.items():  # an experiment made before the tag
                self.client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id

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

    def end(self, study: optuna.Study, interrupted: bool) -> None:
        """Backfills every trial's run from the study, then closes the parent run (KILLED on
        Ctrl-C); says what was backfilled, or how to backfill once the store answers."""
        with self.guard("closing the study's run"):
            created, completed = self.backfill(study)
            # Other processes still running trials (started by hand, on other machines) keep the
            # parent RUNNING; the last one to end closes it.
            if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                self.close_parent(study, "KILLED" if interrupted else "FINISHED")
            if created or completed:
                print(f"MLflow: {created} trial run(s) backfilled from the study and {completed} "
                      "completed (logging had failed while they ran).", flush=True)
            return
        missing = sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))
        print(f"MLflow: the tracking store still fails; up to {missing} trial run(s) may be "
              f"missing or incomplete. Once it answers: python -m search.sync "
              f"{self.config.location_args(storage=True)}", file=sys.stderr)

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

    # -- backfilling from the Optuna storage (the source of truth)

    def backfill(self, study: optuna.Study) -> tuple[int, int]:
        """Creates the run of every trial that has none and completes every run that stopped
        short of its trial (an outage, a killed worker), without duplicating what exists.
        Returns (runs created, runs completed)."""
        parent = self.parent_for(study, running=False)
        runs: dict[int, list] = {}
        for run in self.client.search_runs(
                [self.experiment_id], max_results=50_000,
                filter_string=f"tags.`{ROLE_TAG}` = 'trial' and tags.`{PARENT_TAG}` = '{parent}'"):
            number = run.data.tags.get("trial_number", "")
            if number.isdigit():
                runs.setdefault(int(number), []).append(run)
        created = completed = 0
        for trial in study.get_trials(deepcopy=False):
            if trial.state in (TrialState.WAITING, TrialState.RUNNING):
                continue  # not over yet: the process running it logs it
            mine = runs.get(trial.number, [])
            linked = trial.user_attrs.get(TrialAttr.MLFLOW_RUN_ID)
            run = next((r for r in mine if r.info.run_id == linked), mine[0] if mine else None)
            if run is None:
                self._create_trial_run(trial, parent)
                created += 1
            elif run.info.status != RUN_STATUS.get(trial.state, "FAILED") or not run.data.params:
                self._finish_trial_run(run.info.run_id, trial, logged_params=run.data.params)
                completed += 1
        return created, completed

    def trial_tags(self, trial: optuna.Trial | FrozenTrial, parent: str) -> dict[str, str]:
        tags = {PARENT_TAG: parent, ROLE_TAG: "trial", "study_name": self.config.study_name,
                "trial_number": str(trial.number), "state": "RUNNING",
                "device": str(resolve_device(self.config.device)),
                "torch_version": torch.__version__, "mlflow.source.name": "search.run"}
        if self.commit:
            tags[GIT_COMMIT_TAG] = self.commit
        for attr in (TrialAttr.BASELINE, TrialAttr.RETRY_OF, TrialAttr.PRECISION):
            if trial.user_attrs.get(attr) is not None:
                tags[str(attr)] = str(trial.user_attrs[attr])
        return tags

    def trial_params(self, params: dict[str, Any]) -> list[Param]:
        fixed = {"model": self.config.model, "dataset": self.config.dataset,
                 "epochs": self.config.epochs, "seed": self.config.seed}
        return [Param(k, param_value(v)) for k, v in {**fixed, **params}.items()]

    def _create_trial_run(self, trial: FrozenTrial, parent: str) -> None:
        start = int(trial.datetime_start.timestamp() * 1000) if trial.datetime_start else None
        run = self.client.create_run(self.experiment_id, start_time=start,
                                     tags={**self.trial_tags(trial, parent), "backfilled": "true"},
                                     run_name=f"trial-{trial.number:04d}")
        self._finish_trial_run(run.info.run_id, trial, logged_params={})

    def _finish_trial_run(self, run_id: str, trial: FrozenTrial,
                          logged_params: dict[str, str]) -> None:
        """The params, epochs, final metrics and tags the run lacks, and the status, all from
        the trial (the run may have been cut short anywhere: even before its params)."""
        params = [p for p in self.trial_params(params_of(trial, self.config.space))
                  if p.key not in logged_params]
        if params:
            self.client.log_batch(run_id, params=params)
        logged = {m.step for m in self.client.get_metric_history(run_id, "val_accuracy")}
        now = now_ms()
        metrics = [Metric(k, float(v), now, epoch["epoch"])
                   for epoch in trial_epochs(trial) if epoch["epoch"] not in logged
                   for k, v in epoch.items() if k != "epoch" and v is not None]
        metrics += final_metrics(trial.user_attrs, len(trial.intermediate_values))
        end = int(trial.datetime_complete.timestamp() * 1000) if trial.datetime_complete else now
        self.client.log_batch(run_id, metrics=metrics)  # MlflowClient splits it into batches
        self.client.log_batch(run_id, tags=end_tags(trial.state, trial.user_attrs))
        self.client.set_terminated(run_id, RUN_STATUS.get(trial.state, "FAILED"), end_time=end)

# ---------------------------------------------------------------- one run per trial

def trial_epochs(trial: FrozenTrial) -> list[dict[str, Any]]:
    """A finished trial's per-epoch metrics as the objective recorded them, else (a trial whose
    process died) the validation accuracies Optuna has."""
    recorded = trial.user_attrs.get(TrialAttr.EPOCHS)
    if isinstance(recorded, list) and recorded:
        return recorded
    return [{"epoch": e, "val_accuracy": v} for e, v in sorted(trial.intermediate_values.items())]


def final_metrics(attrs: dict[str, Any], step: int) -> list[Metric]:
    now = now_ms()
    return [Metric(name, float(attrs[key]), now, step)
            for key, name in FINAL_METRICS.items() if attrs.get(key) is not None]


def end_tags(state: TrialState, attrs: dict[str, Any]) -> list[RunTag]:
    tags = [RunTag("state", state.name)]
    for key in (TrialAttr.PRUNED_AT_EPOCH, TrialAttr.OVER_BUDGET, TrialAttr.RESUMED_FROM_EPOCH):
        if key in attrs:
            tags.append(RunTag(str(key), str(attrs[key])))
    if state == TrialState.FAIL:
        reason = attrs.get(TrialAttr.FAIL_REASON) or "unexpected error (see the console output)"
        tags.append(RunTag("fail_reason", str(reason)[:5000]))
    return tags


class TrialLogger:
    """A `TrialObserver` logging each trial of this process as a run nested under the study's
    parent run (see the module docstring); `close` prints what the logging cost."""

    def __init__(self, study_run: ParentRun) -> None:
        self.study_run = study_run
        self.client = study_run.client
        self.trials = 0
        self._runs: dict[int, str] = {}   # trial number -> run id (threads may share a logger)

    def trial_started(self, trial: optuna.Trial, params: dict[str, Any]) -> None:
        if not self.study_run.available():
            return
        self.trials += 1
        with self.study_run.guard(f"starting trial {trial.number}"):
            tags = self.study_run.trial_tags(trial, self.study_run.parent_for(trial.study))
            start = int(trial.datetime_start.timestamp() * 1000) if trial.datetime_start else None
            run = self.client.create_run(self.study_run.experiment_id, start_time=start,
                                         tags=tags, run_name=f"trial-{trial.number:04d}")
            self._runs[trial.number] = run.info.run_id
            trial.set_user_attr(TrialAttr.MLFLOW_RUN_ID, run.info.run_id)
            self.client.log_batch(run.info.run_id, params=self.study_run.trial_params(params))

    def epoch_ended(self, trial: optuna.Trial, metrics: EpochMetrics) -> None:
        run_id = self._runs.get(trial.number)
        if run_id is None or not self.study_run.available():
            return
        with self.study_run.guard(f"logging epoch {metrics.epoch} of trial {trial.number}"):
            now = now_ms()
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, metrics.epoch)
                                                   for k, v in metrics.as_dict().items()])

    def trial_finished(self, trial: optuna.Trial, state: TrialState, params: dict[str, Any],
                       attrs: dict[str, Any], history: list[EpochMetrics]) -> None:
        run_id = self._runs.pop(trial.number, None)
        if run_id is None or not self.study_run.available() or state == TrialState.RUNNING:
            return  # (RUNNING: the storage failed; the backfill closes the run once recovered)
        with self.study_run.guard(f"finishing trial {trial.number}"):
            self.client.log_batch(run_id, metrics=final_metrics(attrs, len(history)),
                                  tags=end_tags(state, attrs))
            self.client.set_terminated(run_id, RUN_STATUS.get(state, "FAILED"), end_time=now_ms())
            if state == TrialState.COMPLETE and history:
                self._update_best(trial, history[-1].val_accuracy, params, run_id)

    def _update_best(self, trial: optuna.Trial, value: float, params: dict[str, Any],
                     run_id: str) -> None:
        """The parent's best so far; this trial is not yet told to Optuna, so compare with it."""
        try:
            best = trial.study.best_trial
        except ValueError:  # no complete trial yet
            best = None
        if best is None or value >= best.value:
            self.study_run.log_best(trial.number, value, params, run_id, step=trial.number)
        else:
            self.study_run.log_best(best.number, best.value, best.params,
                                    best.user_attrs.get(TrialAttr.MLFLOW_RUN_ID, ""), step=trial.number)

    def close(self) -> None:
        """Prints what logging this process's trials cost."""
        if self.trials:
            config = self.study_run.config
            print(f"MLflow: {self.trials} trial run(s) logged to experiment "
                  f"'{config.study_name}' in {config.tracking_uri}; logging took "
                  f"{self.study_run.seconds / self.trials * 1000:.0f} ms per trial "
                  f"(+{self.study_run.setup_seconds:.1f} s once to connect).", flush=True)
