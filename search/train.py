"""`python -m search.train study=cnn3 trial=42 [storage=...] [seeds=1] [full=true]`: train one
trial's configuration again, with the same trainer and the same parameters.

By default it trains on the study's training split with the trial's own seed and reports
validation accuracy per epoch next to what the search recorded, so a result can be checked
(seed 1 is the trial's own seed: single-threaded on a CPU it reproduces the trial exactly, while
parallel kernels may differ by a few images). `seeds=N` adds N-1 further seeds, to see how much
of a result is luck. `full=true` trains on train + validation and evaluates once on the test set,
as the report's final evaluation does.
"""

from __future__ import annotations

import statistics
import sys
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.cli import KEY_HELP, command_overrides, help_text, main_guard
from search.errors import SearchError
from search.objective import load_search_data
from search.progress import format_params
from search.report.data import epochs_run
from search.report.final import FinalRunHook, final_evaluation, repeat_seed, retrain
from search.report.source import LOCATION_KEYS, StudySource, open_source, trial_params
from search.trainer import EpochMetrics, resolve_device

SUMMARY = ("Trains one trial's configuration again with the trainer the search used: on the "
           "training split with the trial's seed, reporting validation accuracy next to what the "
           "search recorded, or with full=true on train + validation, evaluated once on the test set.")
KEYS = {
    "study": KEY_HELP["study"],
    "trial": "the trial number to train again (required)",
    "storage": KEY_HELP["storage"],
    "study_name": KEY_HELP["study_name"],
    "seeds": "training runs with different seeds; the first is the trial's own (default: 1)",
    "full": "true: train on train + validation, evaluate on the test set (default: false)",
    "device": KEY_HELP["device"],
    "data_dir": "where the dataset is (default: as the study ran)",
}
EXAMPLES = ["study=cnn3 trial=42", "study=cnn3 trial=42 seeds=3",
            "study=cnn3 trial=42 full=true seeds=3 device=cuda"]


class RetrainOutcome(NamedTuple):
    """What retraining a trial gave, per seed: validation accuracy (full=False) or test accuracy."""

    trial: FrozenTrial
    full: bool
    accuracies: tuple[float, ...]
    histories: tuple[tuple[EpochMetrics, ...], ...]   # per seed; empty when full=True

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else None


def find_trial(source: StudySource, number: int) -> FrozenTrial:
    trials = source.study.get_trials(deepcopy=False)
    match = [t for t in trials if t.number == number]
    if not match:
        raise SearchError(f"trial={number}: study '{source.study.study_name}' has trials "
                          f"0..{len(trials) - 1}." if trials else
                          f"trial={number}: study '{source.study.study_name}' has no trials.")
    if not match[0].params:
        raise SearchError(f"trial={number} has no parameters recorded (state "
                          f"{match[0].state.name.lower()}): nothing to train.")
    return match[0]


def describe(trial: FrozenTrial) -> str:
    state = trial.state.name.lower()
    if trial.state == TrialState.COMPLETE:
        return f"{state}, validation accuracy {trial.value:.4f} after {epochs_run(trial)} epochs"
    if trial.intermediate_values:
        last = max(trial.intermediate_values)
        text = f"{state} after epoch {last} at validation accuracy {trial.intermediate_values[last]:.4f}"
    else:
        text = state
    reason = trial.user_attrs.get("fail_reason")
    return text + (f" ({reason})" if reason else "")


def retrain_trial(source: StudySource, number: int, *, seeds: int = 1, full: bool = False,
                  on_final_run: FinalRunHook | None = None,
                  log: Callable[[str], None] = print) -> RetrainOutcome:
    """Trains trial `number`'s configuration `seeds` times for the study's full epoch budget."""
    config, trial = source.config, find_trial(source, number)
    device = resolve_device(config.device)
    log(f"Trial {trial.number} of study '{source.study.study_name}' ({describe(trial)}): "
        f"{config.model} on {config.dataset}, {config.epochs} epochs, device {device}")
    log(f"  params: {format_params(trial_params(trial, config), limit=99)}")
    if full:
        log("  full=true: training on train + validation and evaluating once on the test set.")
        evaluation = final_evaluation(config, [(f"trial {trial.number}", trial)], seeds=seeds,
                                      device=device, on_run=on_final_run, log=log,
                                      with_predictions=False)
        return RetrainOutcome(trial, True, evaluation.results[0].test_accuracies, ())
    data = load_search_data(config)
    params = trial_params(trial, config)
    accuracies, histories = [], []
    for repeat in range(seeds):
        seed = repeat_seed(config.seed, trial.number, repeat)

        def on_epoch(metrics: EpochMetrics) -> bool:
            recorded = trial.intermediate_values.get(metrics.epoch)
            log(f"  seed {repeat + 1}/{seeds} epoch {metrics.epoch:>3}: train_loss "
                f"{metrics.train_loss:.4f} val_accuracy {metrics.val_accuracy:.4f}"
                + (f"  (search: {recorded:.4f})" if recorded is not None and repeat == 0 else ""))
            return False

        result = retrain(config, params, train_data=data.train, val_data=data.val, spec=data.spec,
                         seed=seed, device=device, on_epoch=on_epoch)
        accuracies.append(result.history[-1].val_accuracy)
        histories.append(tuple(result.history))
    return RetrainOutcome(trial, False, tuple(accuracies), tuple(histories))


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SearchError(f"{key}={value!r}: expected true or false.")
    return value


def _count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "trial" else 1):
        raise SearchError(f"{key}={value!r}: expected a whole number >= {0 if key == 'trial' else 1}.")
    return value


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text("search.train", SUMMARY, KEYS, EXAMPLES, options=()))
        return 0
    overrides = command_overrides(argv, "search.train", KEYS)
    if "trial" not in overrides:
        raise SearchError("no trial given: add trial=NUMBER (the report's top table lists them).")
    number = _count("trial", overrides["trial"])
    seeds = _count("seeds", overrides.get("seeds", 1))
    full = _flag("full", overrides.get("full", False))
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    source = open_source({k: v for k, v in overrides.items() if k in LOCATION_KEYS})
    outcome = retrain_trial(source, number, seeds=seeds, full=full)
    what = "test accuracy" if full else "validation accuracy"
    spread = f" ± {outcome.std:.4f} (sample std over {seeds} seeds)" if outcome.std is not None else ""
    print(f"{what}: {outcome.mean:.4f}{spread}; per seed: "
          + ", ".join(f"{a:.4f}" for a in outcome.accuracies))
    recorded = outcome.trial.intermediate_values
    if not full and recorded:
        # Compare at the last epoch the search saw (a pruned trial stopped before the budget).
        epoch = max(recorded)
        retrained = outcome.histories[0][epoch - 1].val_accuracy
        print(f"the search recorded {recorded[epoch]:.4f} at epoch {epoch} for trial {number}; "
              f"seed 1 got {retrained:.4f} there ({retrained - recorded[epoch]:+.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
