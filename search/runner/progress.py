"""What a person watching a study sees: a progress bar over trials with the best value so far on
a terminal, and one plain line per trial everywhere (CI logs, files, `nohup`)."""

from __future__ import annotations

import sys

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from search.config.errors import first_line
from search.config.params import format_params
from search.config.settings import StudyConfig
from search.config.urls import masked
from search.storage.trials import TrialAttr, count_finished, counts_toward_n_trials


def describe_trial(trial: FrozenTrial) -> str:
    """One line: number, state, value, epochs run and key params (and why it failed)."""
    state = trial.state.name.lower()
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    epochs = trial.user_attrs.get(TrialAttr.EPOCHS_RUN, "?")
    line = f"trial {trial.number:>3} {state:<8} val_accuracy={value} epochs={epochs}"
    if trial.user_attrs.get(TrialAttr.BASELINE) is not None:
        line += " [baseline]"
    line += "  " + format_params(trial.params)
    if trial.state == TrialState.FAIL and trial.user_attrs.get(TrialAttr.FAIL_REASON):
        line += f"  ({trial.user_attrs[TrialAttr.FAIL_REASON]})"
    if TrialAttr.OVER_BUDGET in trial.user_attrs:
        line += f"  (not trained: {trial.user_attrs[TrialAttr.OVER_BUDGET]:,} parameters, over max_params)"
    return line


class Progress:
    """An Optuna callback; the bar shows only on a terminal, the per-trial lines always."""

    def __init__(self, total: int, done: int, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.bar = tqdm(total=total, initial=done, unit="trial", dynamic_ncols=True,
                        file=self.stream, disable=not self.stream.isatty(), desc="trials")

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        message = describe_trial(trial)
        if self.bar.disable:
            print(message, file=sys.stdout, flush=True)
        else:
            self.bar.write(message)
        if counts_toward_n_trials(trial):
            self.bar.update(1)
        best = _best_value(study)
        if best is not None:
            self.bar.set_postfix_str(f"best={best:.4f}")

    def close(self) -> None:
        self.bar.close()


def _best_value(study: optuna.Study) -> float | None:
    try:
        return study.best_value
    except ValueError:  # no complete trial yet
        return None


class TrialLines:
    """An Optuna callback for `workers=N`: one line per trial, prefixed with the worker, with
    the study's finished count (one progress bar per process would garble the terminal)."""

    def __init__(self, index: int, n_trials: int) -> None:
        self.index, self.n_trials = index, n_trials

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        print(f"[worker {self.index}] {describe_trial(trial)}  ({count_finished(study)}/"
              f"{self.n_trials} finished)", flush=True)

    def close(self) -> None:
        pass


def described(error: BaseException) -> str:
    """An error as one line that names it: its class, then its message's first line, with the
    password of any URL in it masked. Optuna's `StorageInternalError` ("An exception is raised
    during the commit ...") is a wrapper: the database error under it is the one named.

    Example: `sqlalchemy.exc.OperationalError: (psycopg.OperationalError) connection failed: ...`
    """
    while isinstance(error, optuna.exceptions.StorageInternalError) and error.__cause__ is not None:
        error = error.__cause__
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    if not str(error).strip():
        return name
    return f"{name}: " + " ".join(masked(word) for word in first_line(error).split(" "))


def storage_failure(config: StudyConfig, error: BaseException) -> str:
    """One paragraph for a storage that failed mid-run, naming the error (`described`); what was
    committed stays consistent."""
    return (f"error: the storage {config.storage} failed while the study ran "
            f"({described(error)}). Every trial it recorded is intact (a failed write changes "
            "nothing); fix the cause (free disk space, restart the database server), then rerun "
            "the same command: it resumes the study and retries the interrupted trial.")


def print_summary(study: optuna.Study, config: StudyConfig,
                  experiment_id: str | None = None) -> int:
    """The study's trial counts, its best trial and the commands to look further; exit code 0.

    Args:
        study: the study that ran.
        config: its config.
        experiment_id: the study's MLflow experiment, whose runs are linked; None when MLflow
            logging is off, and nothing about MLflow is printed.
    """
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    print("Trials: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n))
    if not any(t.state == TrialState.COMPLETE for t in trials):
        print("No trial completed yet; rerun to continue the study.")
        return 0
    best = study.best_trial
    print(f"Best: {describe_trial(best)}")
    print(f"  params: {format_params(best.params, limit=99)}")
    args = config.location_args(storage=True)
    print("Next:")
    print(f"  python -m search.dashboard {args}   # optuna-dashboard: trials, curves, importances")
    if config.tracking_enabled and experiment_id is not None:
        from search.tracking.ui_links import ui_access

        command, link = ui_access(config.tracking_uri, experiment_id)
        if command is not None:
            print(f"  {command}   # serves the MLflow UI; then:")
        print(f"  open {link}   # MLflow: compare runs")
    print(f"  python -m search.report {args}   # tables, plots, final test accuracy")
    return 0
