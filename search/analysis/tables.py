"""What the report shows, computed from a study and nothing else: tables as pandas frames,
curves as NamedTuples. No drawing here (`figures.py` draws), no files (`compose.py` writes).

Every function reads only the storage, so it works on a study that is still running.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any, NamedTuple

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from search.config.params import PARAMS
from search.config.settings import StudyConfig
from search.config.strategies import describe_pruner, describe_sampler
from search.storage.reading import retrain_command
from search.storage.trials import FINISHED, TrialAttr, counts_toward_n_trials, params_of

# "Within 1% of the best": one percentage point of validation accuracy.
COST_TOLERANCE = 0.01
# Columns of trials.csv that come from the objective's user attrs, in reading order.
ATTR_COLUMNS = tuple(map(str, (
    TrialAttr.EPOCHS_RUN, TrialAttr.BEST_EPOCH, TrialAttr.BEST_VAL_ACCURACY,
    TrialAttr.PARAMETER_COUNT, TrialAttr.SECONDS_PER_EPOCH, TrialAttr.IMAGES_PER_SECOND,
    TrialAttr.TRAIN_SECONDS, TrialAttr.PRUNED_AT_EPOCH, TrialAttr.FAIL_REASON,
    TrialAttr.BASELINE)))


def epochs_run(trial: FrozenTrial) -> int:
    """Epochs the trial trained (the recorded count, else the epochs it reported)."""
    recorded = trial.user_attrs.get(TrialAttr.EPOCHS_RUN)
    return int(recorded) if recorded is not None else len(trial.intermediate_values)


def is_baseline(trial: FrozenTrial) -> bool:
    return trial.user_attrs.get(TrialAttr.BASELINE) is not None


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


# ---------------------------------------------------------------- summary

class Summary(NamedTuple):
    """The facts at the top of a report."""

    study_name: str
    model: str
    dataset: str
    epochs: int
    sampler: str
    pruner: str
    space: tuple[tuple[str, str, str], ...]     # (parameter, values searched, meaning)
    counts: dict[str, int]                      # state name (lower case) -> trials
    best_value: float | None
    best_trial: int | None
    wall_seconds: float                         # first start to last recorded event
    compute_seconds: float                      # sum of trial durations
    epochs_run: int                             # over finished trials
    epochs_without_pruning: int                 # finished trials x epoch budget

    @property
    def finished(self) -> int:
        return self.counts.get("complete", 0) + self.counts.get("pruned", 0)

    @property
    def epochs_saved(self) -> float:
        """Fraction of the epochs a search without pruning would have trained that were saved."""
        if not self.epochs_without_pruning:
            return 0.0
        return 1 - self.epochs_run / self.epochs_without_pruning


def summarize(study: optuna.Study, config: StudyConfig) -> Summary:
    trials = study.get_trials(deepcopy=False)
    order = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING,
             TrialState.WAITING)
    over = [t for t in trials if TrialAttr.OVER_BUDGET in t.user_attrs]  # never trained
    counts = {state.name.lower(): sum(t.state == state and t not in over for t in trials)
              for state in order}
    counts["over max_params (not trained)"] = len(over)
    finished = [t for t in trials if counts_toward_n_trials(t)]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    starts = [t.datetime_start for t in trials if t.datetime_start]
    events = starts + [t.datetime_complete for t in trials if t.datetime_complete]
    wall = (max(events) - min(starts)).total_seconds() if starts else 0.0
    compute = sum(t.duration.total_seconds() for t in trials if t.duration is not None)
    return Summary(
        study_name=study.study_name, model=config.model, dataset=config.dataset,
        epochs=config.epochs, sampler=describe_sampler(config.sampler, config.seed),
        pruner=describe_pruner(config.pruner, config.epochs),
        space=tuple((spec.name, spec.describe(), PARAMS[spec.name].help) for spec in config.space),
        counts={k: v for k, v in counts.items() if v}, best_value=best.value if best else None,
        best_trial=best.number if best else None, wall_seconds=wall, compute_seconds=compute,
        epochs_run=sum(epochs_run(t) for t in finished),
        epochs_without_pruning=len(finished) * config.epochs)


# ---------------------------------------------------------------- all trials

def trials_frame(study: optuna.Study, config: StudyConfig) -> pd.DataFrame:
    """One row per trial: number, state, value, duration, epochs run, the objective's facts and
    every parameter the trial trained with (fixed ones included), as `param_<name>` columns."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "datetime_start",
                                          "datetime_complete", "duration"))
    if frame.empty:
        return frame
    trials = study.get_trials(deepcopy=False)
    frame["duration_seconds"] = [t.duration.total_seconds() if t.duration else math.nan
                                 for t in trials]
    frame = frame.drop(columns=["duration"])
    for column in ATTR_COLUMNS:
        frame[column] = [t.user_attrs.get(column) for t in trials]
    frame["epochs_run"] = [epochs_run(t) for t in trials]
    frame["baseline"] = [is_baseline(t) for t in trials]
    frame["learning_curve"] = [json.dumps(_curve(t)[1]) for t in trials]
    params = [params_of(t, config.space) if t.params else {} for t in trials]
    names = [spec.name for spec in config.space] + sorted({k for p in params for k in p}
                                                          - {s.name for s in config.space})
    for name in names:
        frame[f"param_{name}"] = [p.get(name) for p in params]
    return frame


def _curve(trial: FrozenTrial) -> tuple[list[int], list[float]]:
    steps = sorted(trial.intermediate_values)
    return steps, [trial.intermediate_values[s] for s in steps]


# ---------------------------------------------------------------- top-k table

def top_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The k complete trials with the highest validation accuracy (ties: earlier trial first)."""
    return sorted(complete_trials(study), key=lambda t: (-t.value, t.number))[:k]


def baseline_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The latest trial of each baseline (a baseline re-run after an interruption counts once)."""
    latest: dict[Any, FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False):
        if is_baseline(trial) and trial.state != TrialState.WAITING:
            index = trial.user_attrs[TrialAttr.BASELINE]
            if index not in latest or trial.state in FINISHED:
                latest[index] = trial
    return [latest[index] for index in sorted(latest)]


def _seconds(trial: FrozenTrial) -> float | None:
    seconds = trial.user_attrs.get(TrialAttr.TRAIN_SECONDS)
    if seconds is None and trial.duration is not None:
        seconds = trial.duration.total_seconds()
    return seconds


def top_table(top: list[FrozenTrial], baselines: list[FrozenTrial],
              config: StudyConfig) -> pd.DataFrame:
    """Rank, validation accuracy, best epoch, size and time of each top trial, then each
    baseline's row, each with the command that trains that configuration again."""
    rows = []
    entries = [(f"{rank}", t) for rank, t in enumerate(top, 1)]
    entries += [("baseline" if len(baselines) == 1 else f"baseline {t.user_attrs[TrialAttr.BASELINE]}", t)
                for t in baselines]
    for rank, trial in entries:
        value = trial.value if trial.state == TrialState.COMPLETE else None
        if value is None and trial.intermediate_values:
            value = _curve(trial)[1][-1]
        rows.append({
            "rank": rank,
            "trial": trial.number,
            "state": trial.state.name.lower(),
            "val_accuracy": value,
            "best_val_accuracy": trial.user_attrs.get(TrialAttr.BEST_VAL_ACCURACY),
            "best_epoch": trial.user_attrs.get(TrialAttr.BEST_EPOCH),
            "epochs_run": epochs_run(trial),
            "parameter_count": trial.user_attrs.get(TrialAttr.PARAMETER_COUNT),
            "train_seconds": _seconds(trial),
            "command": retrain_command(config, trial.number),
        })
    return pd.DataFrame(rows)


def params_table(trials: list[FrozenTrial], config: StudyConfig,
                 labels: list[str]) -> pd.DataFrame:
    """Parameters as rows, one column per trial (labelled), so a wide space stays readable;
    a parameter a trial did not use (an inactive conditional) is empty."""
    params = [params_of(t, config.space) for t in trials]
    names = [spec.name for spec in config.space]
    names += sorted({k for p in params for k in p} - set(names))
    table = pd.DataFrame({label: [p.get(name) for name in names]
                          for label, p in zip(labels, params)}, index=names)
    table.index.name = "parameter"
    return table


# ---------------------------------------------------------------- cost to best

class CostToBest(NamedTuple):
    """Best validation accuracy so far after each trial, in the order trials ended (with
    several workers, that is the order results became known).

    `trials_needed` and `seconds_needed` are the first point where the best so far came within
    `tolerance` of the study's best: how much search a result this good took.
    """

    numbers: tuple[int, ...]                    # trial numbers of ended trials, all states
    elapsed_seconds: tuple[float, ...]          # from the first start to that trial's end
    best_so_far: tuple[float | None, ...]
    best: float
    tolerance: float
    trials_needed: int
    seconds_needed: float
    reached_by: int                             # the trial number that got there


def cost_to_best(study: optuna.Study, tolerance: float = COST_TOLERANCE) -> CostToBest | None:
    """None when no trial has completed."""
    trials = study.get_trials(deepcopy=False)
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    ended = sorted((t for t in trials if t.datetime_complete is not None),
                   key=lambda t: (t.datetime_complete, t.number))
    complete = [t.value for t in ended if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    best, start = max(complete), min(starts)
    numbers, elapsed, so_far = [], [], []
    running_best: float | None = None
    reached: tuple[int, float, int] | None = None
    for count, trial in enumerate(ended, 1):
        if trial.state == TrialState.COMPLETE:
            running_best = trial.value if running_best is None else max(running_best, trial.value)
        numbers.append(trial.number)
        elapsed.append((trial.datetime_complete - start).total_seconds())
        so_far.append(running_best)
        if reached is None and running_best is not None and running_best >= best - tolerance:
            reached = (count, elapsed[-1], trial.number)
    assert reached is not None  # the best trial itself reaches it
    return CostToBest(tuple(numbers), tuple(elapsed), tuple(so_far), best, tolerance, *reached)


# ---------------------------------------------------------------- learning curves

class LearningCurve(NamedTuple):
    number: int
    state: str                                  # complete, pruned, fail, running
    epochs: tuple[int, ...]
    val_accuracy: tuple[float, ...]
    baseline: bool


def learning_curves(study: optuna.Study) -> list[LearningCurve]:
    """Validation accuracy per epoch of every trial that reported at least one epoch."""
    curves = []
    for trial in study.get_trials(deepcopy=False):
        steps, values = _curve(trial)
        if steps:
            curves.append(LearningCurve(trial.number, trial.state.name.lower(), tuple(steps),
                                        tuple(values), is_baseline(trial)))
    return curves


# ---------------------------------------------------------------- parameter importances

class Importances(NamedTuple):
    """fANOVA importances (summing to 1 over all parameters), most important first, of the
    parameters that varied; empty with a reason when they cannot be computed (fewer than two
    complete trials, nothing varied)."""

    values: dict[str, float]
    reason: str | None = None


def param_importances(study: optuna.Study, seed: int = 0) -> Importances:
    complete = complete_trials(study)
    if len(complete) < 2:
        return Importances({}, f"needs at least 2 complete trials (this study has {len(complete)})")
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    try:
        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError) as error:
        return Importances({}, str(error).strip().splitlines()[0])
    # A parameter fixed to one choice (space.width_1.choices=[8]) has importance 0 by definition.
    varied = set(varied_params(study))
    values = {name: value for name, value in values.items() if name in varied}
    if not values:
        return Importances({}, "no parameter took more than one value in all complete trials")
    return Importances(values)


def varied_params(study: optuna.Study) -> list[str]:
    """Searched parameters that took at least two values across complete trials."""
    seen: dict[str, set] = {}
    for trial in complete_trials(study):
        for name, value in trial.params.items():
            seen.setdefault(name, set()).add(repr(value))
    return [name for name, values in seen.items() if len(values) > 1]


def important_params(study: optuna.Study, importances: Importances, limit: int) -> list[str]:
    """The `limit` most important parameters, or the varied ones when there are no importances."""
    varied = varied_params(study)
    ranked = [name for name in importances.values if name in varied] or varied
    return ranked[:limit]


# ---------------------------------------------------------------- accuracy against size

class SizeFrontier(NamedTuple):
    """Validation accuracy of complete trials against their parameter count. `pareto` lists the
    trials no smaller trial beats (by size), the configurations worth choosing between."""

    numbers: tuple[int, ...]
    parameter_counts: tuple[int, ...]
    values: tuple[float, ...]
    pareto: tuple[int, ...]
    budget: int | None                          # max_params, when the study had one


def size_frontier(study: optuna.Study, config: StudyConfig) -> SizeFrontier | None:
    """None when no complete trial recorded its size."""
    sized = sorted(((t.user_attrs[TrialAttr.PARAMETER_COUNT], -t.value, t.number)
                    for t in complete_trials(study) if TrialAttr.PARAMETER_COUNT in t.user_attrs))
    if not sized:
        return None
    pareto, best = [], float("-inf")
    for count, negative, number in sized:
        if -negative > best:
            pareto.append(number)
            best = -negative
    return SizeFrontier(tuple(n for _, _, n in sized), tuple(c for c, _, _ in sized),
                        tuple(-v for _, v, _ in sized), tuple(pareto), config.max_params)


def frontier_table(frontier: SizeFrontier) -> pd.DataFrame:
    rows = [{"trial": n, "parameter_count": c, "val_accuracy": v}
            for n, c, v in zip(frontier.numbers, frontier.parameter_counts, frontier.values)
            if n in frontier.pareto]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- categorical effects

class CategoricalEffect(NamedTuple):
    """Validation accuracy of complete trials grouped by one categorical parameter's values."""

    param: str
    choices: tuple[Any, ...]                    # in the space's order
    values: tuple[tuple[float, ...], ...]       # accuracies per choice


def categorical_effects(study: optuna.Study, config: StudyConfig) -> list[CategoricalEffect]:
    """One entry per categorical parameter with more than one choice seen in complete trials."""
    complete = complete_trials(study)
    effects = []
    for spec in config.space:
        if spec.kind != "categorical" or len(spec.choices) < 2:
            continue
        grouped = [tuple(t.value for t in complete if t.params.get(spec.name) == choice)
                   for choice in spec.choices]
        if sum(1 for g in grouped if g) >= 2:
            effects.append(CategoricalEffect(spec.name, spec.choices, tuple(grouped)))
    return effects


def categorical_table(effects: list[CategoricalEffect]) -> pd.DataFrame:
    """Count, mean and best accuracy per value (pandas does the statistics)."""
    rows = [{"parameter": e.param, "value": choice, "val_accuracy": v}
            for e in effects for choice, values in zip(e.choices, e.values) for v in values]
    if not rows:
        return pd.DataFrame(columns=["parameter", "value", "trials", "mean", "best"])
    frame = pd.DataFrame(rows)
    frame["value"] = frame["value"].astype(str)
    table = (frame.groupby(["parameter", "value"], sort=False)["val_accuracy"]
             .agg(trials="count", mean="mean", best="max").reset_index())
    return table


def now() -> str:
    return datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
