"""The live observer: each trial of this process in MLflow while it runs.

`TrialLogger` creates a trial's run as it starts and logs each epoch's metrics as the epoch ends,
so a person watches the run in the MLflow UI during the trial. The end of the trial is not its
own code: it is the backfill of that one trial (`trial_runs.backfill_trial`), from the trial as
the storage holds it, so a run ends the same way whoever ends it.
"""

from __future__ import annotations

import copy
from typing import Any

import optuna
from mlflow.entities import Metric
from optuna.trial import FrozenTrial, TrialState

from search.storage.trials import TrialAttr
from search.tracking.run_values import now_ms
from search.tracking.study_run import ParentRun
from search.tracking.trial_runs import backfill_trial, create_trial_run
from search.training.results import EpochMetrics


def ended_trial(trial: optuna.Trial, state: TrialState) -> FrozenTrial:
    """The trial as the storage holds it, in the state its objective is about to tell Optuna
    (observers hear of a trial's end just before Optuna records it; its user attributes, the
    final facts included, are stored already)."""
    stored = copy.copy(trial.storage.get_trial(trial._trial_id))  # Optuna has no public accessor
    stored.state = state
    return stored


class TrialLogger:
    """A `TrialObserver` logging each trial of this process as a run nested under the study's
    parent run; `close` prints what the logging cost."""

    def __init__(self, study_run: ParentRun) -> None:
        self.study_run = study_run
        self.client = study_run.client
        self.trials = 0
        self._runs: dict[int, str] = {}   # trial number -> run id (threads may share a logger)

    def trial_started(self, trial: optuna.Trial, params: dict[str, Any]) -> None:
        if not self.study_run.available():
            return
        self.trials += 1
        def created(run_id: str) -> None:
            self._runs[trial.number] = run_id
            trial.set_user_attr(TrialAttr.MLFLOW_RUN_ID, run_id)

        with self.study_run.guard(f"starting trial {trial.number}"):
            create_trial_run(self.study_run, trial, self.study_run.parent_for(trial.study),
                             created=created)

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
            backfill_trial(self.study_run, ended_trial(trial, state),
                           self.study_run.parent_for(trial.study), [self.client.get_run(run_id)])
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
