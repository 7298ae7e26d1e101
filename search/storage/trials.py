"""What the storage records about trials and studies beyond Optuna's own columns: every user
attribute key, what it means and which module writes it, and which trials count toward
`n_trials`.

The keys are `StrEnum` members, so they are the plain strings Optuna stores
(`trial.user_attrs[TrialAttr.SEED]`), and a key exists only here: a new attribute is one line
in `TrialAttr` or `StudyAttr` and one in `MEANING` (a test checks that every code path reads
and writes attributes through these names, never a bare string).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.config.space import LEFT_OUT, ParamSpec, suggest, walk


class TrialAttr(StrEnum):
    OWNER = "owner"
    SAMPLER_SEED = "sampler_seed"
    RETRY_OF = "retry_of"
    BASELINE = "baseline"
    WARM_START = "warm_start"
    SEED = "seed"
    FIXED_PARAMS = "fixed_params"
    CHECKPOINT = "checkpoint"
    MLFLOW_RUN_ID = "mlflow_run_id"
    OVER_BUDGET = "over_budget"
    PARAMETER_COUNT = "parameter_count"
    EPOCHS_RUN = "epochs_run"
    TRAIN_SECONDS = "train_seconds"
    BEST_EPOCH = "best_epoch"
    BEST_VAL_ACCURACY = "best_val_accuracy"
    SECONDS_PER_EPOCH = "seconds_per_epoch"
    IMAGES_PER_SECOND = "images_per_second"
    EPOCHS = "epochs"
    FAIL_REASON = "fail_reason"
    PRUNED_AT_EPOCH = "pruned_at_epoch"
    RESUMED_FROM_EPOCH = "resumed_from_epoch"


class StudyAttr(StrEnum):
    FINGERPRINT_SOURCE = "fingerprint_source"
    FINGERPRINT = "fingerprint"
    CONFIG = "config"
    MODEL = "model"
    DATASET = "dataset"
    EPOCHS = "epochs"
    MLFLOW_PARENT_RUN_ID = "mlflow_parent_run_id"


# (writer, meaning) of every attribute: the reference for whoever reads a study's trials.
MEANING: dict[TrialAttr | StudyAttr, tuple[str, str]] = {
    TrialAttr.OWNER: ("runner.process", "{host, pid, started} of the process running the trial, "
                      "asked whether it still runs (storage.recovery)"),
    TrialAttr.SAMPLER_SEED: ("runner.process", "the seed of the sampler that proposed the trial"),
    TrialAttr.RETRY_OF: ("storage.recovery", "the number of the dead trial this one repeats"),
    TrialAttr.BASELINE: ("storage.studies", "index of the study file's baseline it runs"),
    TrialAttr.WARM_START: ("storage.studies", "'study#trial' its configuration was taken from"),
    TrialAttr.SEED: ("runner.objective", "the training seed (a retry keeps the original's)"),
    TrialAttr.FIXED_PARAMS: ("runner.objective", "the space's fixed values, which Optuna does "
                             "not store as params"),
    TrialAttr.CHECKPOINT: ("storage.checkpoints", "{id, epoch} of its last checkpoint artifact"),
    TrialAttr.MLFLOW_RUN_ID: ("tracking.mlflow_runs", "the MLflow run logging the trial"),
    TrialAttr.OVER_BUDGET: ("runner.objective", "parameter count of a model over max_params: "
                            "never trained, and not counted toward n_trials"),
    TrialAttr.PARAMETER_COUNT: ("runner.objective", "the model's trainable parameters"),
    TrialAttr.EPOCHS_RUN: ("runner.objective", "epochs trained before it ended"),
    TrialAttr.TRAIN_SECONDS: ("runner.objective", "wall time of the whole trial"),
    TrialAttr.BEST_EPOCH: ("runner.objective", "the epoch of its best validation accuracy"),
    TrialAttr.BEST_VAL_ACCURACY: ("runner.objective", "its best validation accuracy"),
    TrialAttr.SECONDS_PER_EPOCH: ("runner.objective", "mean epoch time"),
    TrialAttr.IMAGES_PER_SECOND: ("runner.objective", "mean training throughput"),
    TrialAttr.EPOCHS: ("runner.objective", "every epoch's metrics, from which MLflow runs are "
                       "rebuilt (search.sync)"),
    TrialAttr.FAIL_REASON: ("runner.objective, storage.recovery", "why a FAIL trial failed"),
    TrialAttr.PRUNED_AT_EPOCH: ("runner.objective", "the epoch after which it was pruned"),
    TrialAttr.RESUMED_FROM_EPOCH: ("runner.objective", "the checkpoint epoch a retry resumed from"),
    StudyAttr.FINGERPRINT_SOURCE: ("storage.studies", "the config values a resume must not "
                                   "change (storage.checks compares them)"),
    StudyAttr.FINGERPRINT: ("storage.studies", "a hash of fingerprint_source"),
    StudyAttr.CONFIG: ("storage.studies", "the resolved config, passwords masked: how the "
                       "report and search.train read the study"),
    StudyAttr.MODEL: ("storage.studies", "the model, for the dashboard's study list"),
    StudyAttr.DATASET: ("storage.studies", "the data set, likewise"),
    StudyAttr.EPOCHS: ("storage.studies", "the epoch budget, likewise"),
    StudyAttr.MLFLOW_PARENT_RUN_ID: ("tracking.mlflow_runs", "the study's MLflow parent run"),
}
# What a retry inherits from the trial it repeats.
INHERITED = (TrialAttr.BASELINE, TrialAttr.SEED)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def counts_toward_n_trials(trial: FrozenTrial) -> bool:
    """Finished (complete or pruned) and trained: a model over max_params does not count."""
    return trial.state in FINISHED and TrialAttr.OVER_BUDGET not in trial.user_attrs


def count_finished(study: optuna.Study) -> int:
    return sum(map(counts_toward_n_trials, study.get_trials(deepcopy=False, states=FINISHED)))


def params_of(trial: FrozenTrial, space: Sequence[ParamSpec]) -> dict[str, Any]:
    """The full parameter dict a finished trial trained with, fixed values and conditionals
    included: the space replayed on the trial's own values, as the objective did.

    Falls back to the stored params plus the recorded fixed values when the trial does not fit
    the space (a study run under an older space).
    """
    try:
        return suggest(optuna.trial.FixedTrial(dict(trial.params), trial.number), space)
    except ValueError:
        stored = {**trial.user_attrs.get(TrialAttr.FIXED_PARAMS, {}), **trial.params}
        return {**walk(space, lambda spec, _: stored.get(spec.name, LEFT_OUT)), **stored}
