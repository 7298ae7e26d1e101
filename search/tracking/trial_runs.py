"""Each trial's MLflow run, written from the trial as the Optuna storage holds it.

A trial's run (`trial-0007`, nested under the study's parent run) carries every parameter
(sampled and fixed), the per-epoch metrics at `step=epoch`, final metrics, tags and a status that
mirrors the Optuna state (FINISHED / KILLED / FAILED for complete / pruned / failed). Either side
leads to the other: the Optuna trial stores the run id (user attribute `mlflow_run_id`), the run
stores the trial number (tag `trial_number`).

The storage is the source of truth, and one writer turns it into runs: `create_trial_run` makes a
trial's run (at the trial's start, or later for a trial that has none) and `backfill_trial`
brings one ended trial's run up to the trial (what it lacks: params, epochs, final metrics, tags,
status). The live observer (`search.tracking.live`) calls it as its trial ends; the end of the
study (`end_study`) and `search.sync` call it for every trial (`backfill`), so an outage, a
killed worker or a crash leaves nothing that a rerun does not complete, and nothing twice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import optuna
import torch
from mlflow.entities import Metric, Param, Run, RunTag
from optuna.trial import FrozenTrial, TrialState

from search.storage.trials import TrialAttr, params_of
from search.tracking.run_values import GIT_COMMIT_TAG, now_ms, param_value
from search.tracking.study_run import PARENT_TAG, ROLE_TAG, ParentRun
from search.training.loop import resolve_device

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


# ---------------------------------------------------------------- one trial's run

def create_trial_run(study_run: ParentRun, trial: optuna.Trial | FrozenTrial, parent: str, *,
                     backfilled: bool = False,
                     created: Callable[[str], None] | None = None) -> str:
    """A new run for `trial` under `parent`, with its tags and params; returns its id.

    `created(run_id)` is called as soon as the run exists, before its params are sent: a live
    trial records its run there, so a store that fails in between leaves a run its trial leads
    to, never one that only the trial number finds."""
    start = int(trial.datetime_start.timestamp() * 1000) if trial.datetime_start else None
    tags = trial_tags(study_run, trial, parent)
    if backfilled:
        tags["backfilled"] = "true"
    run = study_run.client.create_run(study_run.experiment_id, start_time=start, tags=tags,
                                      run_name=f"trial-{trial.number:04d}")
    if created is not None:
        created(run.info.run_id)
    study_run.client.log_batch(run.info.run_id, params=trial_params(study_run, trial))
    return run.info.run_id


def backfill_trial(study_run: ParentRun, trial: FrozenTrial, parent: str,
                   runs: list[Run]) -> str | None:
    """Brings the run of one ended trial up to the trial: created when `runs` (the trial's runs
    found so far) holds none, completed when it stopped short (an outage, a killed worker, or
    simply the end of the trial being logged live). Returns "created", "completed" or None (the
    run was complete already)."""
    linked = trial.user_attrs.get(TrialAttr.MLFLOW_RUN_ID)
    run = next((r for r in runs if r.info.run_id == linked), runs[0] if runs else None)
    if run is None:
        run_id = create_trial_run(study_run, trial, parent, backfilled=True)
    elif run.info.status == RUN_STATUS.get(trial.state, "FAILED") and run.data.params:
        return None
    else:  # the run may have been cut short anywhere: even before its params
        run_id = run.info.run_id
        missing = [p for p in trial_params(study_run, trial) if p.key not in run.data.params]
        if missing:
            study_run.client.log_batch(run_id, params=missing)
    _end_trial_run(study_run, run_id, trial)
    return "created" if run is None else "completed"


def _end_trial_run(study_run: ParentRun, run_id: str, trial: FrozenTrial) -> None:
    """The epochs the run lacks, the final metrics and tags, and the status, all from the trial."""
    client = study_run.client
    logged = {m.step for m in client.get_metric_history(run_id, "val_accuracy")}
    now = now_ms()
    metrics = [Metric(k, float(v), now, epoch["epoch"])
               for epoch in trial_epochs(trial) if epoch["epoch"] not in logged
               for k, v in epoch.items() if k != "epoch" and v is not None]
    metrics += final_metrics(trial.user_attrs, len(trial.intermediate_values))
    # One call: MlflowClient splits it into batches of what the store accepts.
    client.log_batch(run_id, metrics=metrics, tags=end_tags(trial.state, trial.user_attrs))
    end = int(trial.datetime_complete.timestamp() * 1000) if trial.datetime_complete else now
    client.set_terminated(run_id, RUN_STATUS.get(trial.state, "FAILED"), end_time=end)


def trial_tags(study_run: ParentRun, trial: optuna.Trial | FrozenTrial,
               parent: str) -> dict[str, str]:
    tags = {PARENT_TAG: parent, ROLE_TAG: "trial", "study_name": study_run.config.study_name,
            "trial_number": str(trial.number), "state": "RUNNING",
            "device": str(resolve_device(study_run.config.device)),
            "torch_version": torch.__version__, "mlflow.source.name": "search.run"}
    if study_run.commit:
        tags[GIT_COMMIT_TAG] = study_run.commit
    for attr in (TrialAttr.BASELINE, TrialAttr.RETRY_OF, TrialAttr.PRECISION):
        if trial.user_attrs.get(attr) is not None:
            tags[str(attr)] = str(trial.user_attrs[attr])
    return tags


def trial_params(study_run: ParentRun, trial: optuna.Trial | FrozenTrial) -> list[Param]:
    """Every parameter the trial trained with (`params_of`: fixed and conditional ones too) and
    the study's fixed settings."""
    config = study_run.config
    fixed = {"model": config.model, "dataset": config.dataset, "epochs": config.epochs,
             "seed": config.seed}
    params = {**fixed, **params_of(trial, config.space)}
    return [Param(k, param_value(v)) for k, v in params.items()]


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


# ---------------------------------------------------------------- every trial of a study

def backfill(study_run: ParentRun, study: optuna.Study) -> tuple[int, int]:
    """`backfill_trial` for every ended trial of the study, its runs found by their tags.
    Returns (runs created, runs completed)."""
    parent = study_run.parent_for(study, running=False)
    runs: dict[int, list[Run]] = {}
    for run in study_run.client.search_runs(
            [study_run.experiment_id], max_results=50_000,
            filter_string=f"tags.`{ROLE_TAG}` = 'trial' and tags.`{PARENT_TAG}` = '{parent}'"):
        number = run.data.tags.get("trial_number", "")
        if number.isdigit():
            runs.setdefault(int(number), []).append(run)
    done = [backfill_trial(study_run, trial, parent, runs.get(trial.number, []))
            for trial in study.get_trials(deepcopy=False)
            # not over yet: the process running it writes its run
            if trial.state not in (TrialState.WAITING, TrialState.RUNNING)]
    return done.count("created"), done.count("completed")


def end_study(study_run: ParentRun, study: optuna.Study, interrupted: bool) -> None:
    """Backfills every trial's run from the study, then closes the parent run (KILLED on
    Ctrl-C); says what was backfilled, or how to backfill once the store answers. Only the
    process that ends the study calls it."""
    with study_run.guard("closing the study's run"):
        created, completed = backfill(study_run, study)
        # Other processes still running trials (started by hand, on other machines) keep the
        # parent RUNNING; the last one to end closes it.
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study_run.close_parent(study, "KILLED" if interrupted else "FINISHED")
        if created or completed:
            print(f"MLflow: {created} trial run(s) backfilled from the study and {completed} "
                  "completed (logging had failed while they ran).", flush=True)
        return
    missing = sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))
    print(f"MLflow: the tracking store still fails; up to {missing} trial run(s) may be "
          f"missing or incomplete. Once it answers: python -m search.sync "
          f"{study_run.config.location_args(storage=True)}", file=sys.stderr)
