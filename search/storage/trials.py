"""What the storage records about trials and studies beyond Optuna's own columns: every user
attribute key, what it means and which module writes it, and which trials count toward
`n_trials`.

The keys are `StrEnum` members, so they are the plain strings Optuna stores
(`trial.user_attrs[TrialAttr.SEED]`), and a key exists only here: a new attribute is one member
of `TrialAttr` or `StudyAttr`, with its writer and meaning (a test checks that every code path
reads and writes attributes through these names, never a bare string).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.config.space import LEFT_OUT, ParamSpec, suggest, walk


class _Attr(StrEnum):
    """A user attribute key (the plain string Optuna stores), with who writes it and what it
    means: the reference for whoever reads a study's trials."""

    def __new__(cls, key: str, writer: str, meaning: str) -> _Attr:
        member = str.__new__(cls, key)
        member._value_, member.writer, member.meaning = key, writer, meaning
        return member


class TrialAttr(_Attr):
    OWNER = ("owner", "storage.studies", "{host, pid, started} of the process running the "
             "trial, recorded as it starts; storage.recovery asks whether it still runs")
    SAMPLER_SEED = ("sampler_seed", "runner.process", "seed of the sampler that proposed it")
    RETRY_OF = ("retry_of", "storage.recovery", "the number of the trial it repeats, whose "
                "process died or was stopped by a signal")
    BASELINE = ("baseline", "storage.studies", "index of the study file's baseline it runs")
    WARM_START = ("warm_start", "storage.studies", "'study#trial' its configuration came from")
    SEED = ("seed", "runner.objective", "the training seed (a retry keeps the original's)")
    PRECISION = ("precision", "runner.objective", "bf16, fp16 or fp32: the arithmetic it trained "
                 "in on its device (search.training.loop.best_precision)")
    FIXED_PARAMS = ("fixed_params", "runner.objective", "the space's fixed values, which "
                    "Optuna does not store as params")
    CHECKPOINT = ("checkpoint", "storage.checkpoints", "{id, epoch} of its last checkpoint")
    MLFLOW_RUN_ID = ("mlflow_run_id", "tracking.live", "the MLflow run logging it")
    OVER_BUDGET = ("over_budget", "runner.objective", "parameter count of a model over "
                   "max_params: never trained, and not counted toward n_trials")
    PARAMETER_COUNT = ("parameter_count", "runner.objective", "the model's parameters")
    EPOCHS_RUN = ("epochs_run", "runner.objective", "epochs trained before it ended")
    TRAIN_SECONDS = ("train_seconds", "runner.objective", "wall time of the whole trial")
    BEST_EPOCH = ("best_epoch", "runner.objective", "epoch of its best validation accuracy")
    BEST_VAL_ACCURACY = ("best_val_accuracy", "runner.objective", "that best accuracy")
    SECONDS_PER_EPOCH = ("seconds_per_epoch", "runner.objective", "mean epoch time")
    IMAGES_PER_SECOND = ("images_per_second", "runner.objective", "mean training throughput")
    EPOCHS = ("epochs", "runner.objective", "every epoch's metrics, from which MLflow runs are "
              "rebuilt (search.sync)")
    FAIL_REASON = ("fail_reason", "runner.objective, storage.recovery", "why it failed")
    PRUNED_AT_EPOCH = ("pruned_at_epoch", "runner.objective", "the epoch it was pruned after")
    RESUMED_FROM_EPOCH = ("resumed_from_epoch", "runner.objective", "the checkpoint epoch a "
                          "retry resumed from")


class StudyAttr(_Attr):
    FINGERPRINT_SOURCE = ("fingerprint_source", "storage.studies", "the config values a resume "
                          "must not change (storage.checks compares them)")
    FINGERPRINT = ("fingerprint", "storage.studies", "a hash of fingerprint_source")
    CONFIG = ("config", "storage.studies", "the resolved config, passwords masked: how the "
              "report and search.train read the study")
    MODEL = ("model", "storage.studies", "the model, for the dashboard's study list")
    DATASET = ("dataset", "storage.studies", "the data set, likewise")
    EPOCHS = ("epochs", "storage.studies", "the epoch budget, likewise")
    CREATED_COMPLETE = ("created_complete", "storage.studies", "written last when the study is "
                        "created, after its config, fingerprint, baselines and warm starts: a "
                        "study without it is half-made (its creator died), and the next process "
                        "to open it completes the creation (storage.checks.is_created)")
    MLFLOW_PARENT_RUN_ID = ("mlflow_parent_run_id", "tracking.study_run", "the study's MLflow "
                            "parent run")


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
