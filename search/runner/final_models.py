"""Final models: a study's configurations trained again with the trainer the search used, and
the one service that does it for `search.report retrain=topN`, `search.train full=true` and
`search.retrain()` (`train_final_models`): it checks the seeds, makes the output folder
(`<out>/<study_name>/models/`), attaches the MLflow hook when the study's tracking is on,
retrains each configuration on the whole training set (train + validation) for the full epoch
budget with several seeds, evaluates each model once on the test set, saves it, and registers
the first configuration's first seed as `<study_name>-best`. Nothing is created before there
is something to train. `search.train` without `full=true` reproduces a trial on its train and
validation splits (`retrain_trial`). This module is the only one that loads the test split.

Example:
    >>> final = train_final_models(source, [("rank 1", best_trial)], seeds=3,
    ...                            out=Path("reports"), command="search.report")  # doctest: +SKIP
    >>> final.folder, final.registered  # doctest: +SKIP
    (PosixPath('reports/cnn3/models'), ('cnn3-best', '4'))
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from optuna.trial import FrozenTrial, TrialState

from search.config.errors import SearchError
from search.config.params import format_params
from search.config.command_keys import SEEDS
from search.config.settings import StudyConfig
from search.config.urls import writable_folder
from search.storage.reading import StudySource
from search.storage.trials import TrialAttr, params_of
from search.training.augment import BatchLoader
from search.training.classifier import (
    Classifier,
    classifier_from_state,
    model_file,
    network_weights,
    save_classifier,
    score,
)
from search.training.images import (
    DATASETS,
    DatasetSpec,
    ImageSet,
    load_search_data,
    load_split,
)
from search.training.loop import (
    Speed,
    make_loader,
    predict,
    resolve_device,
    train,
)
from search.training.results import (
    MODELS_FOLDER,
    FinalEvaluation,
    FinalResult,
    TestPredictions,
    EpochMetrics,
    FinalTraining,
    ModelCard,
    TrainResult,
    repeat_seed,
)

MAX_TSNE_POINTS = 1000
FinalTrainingHook = Callable[[FinalTraining], None]


def retrain(config: StudyConfig, params: dict[str, Any], *, train_data: ImageSet,
            val_data: ImageSet | None, spec: DatasetSpec, seed: int, device: torch.device,
            on_epoch: Callable[[EpochMetrics], bool | None] | None = None) -> TrainResult:
    """One training run for the study's full epoch budget (no pruning)."""
    return train(config.model, params, train_data=train_data, val_data=val_data, spec=spec,
                 epochs=config.epochs, seed=seed, device=device,
                 on_epoch=(lambda m: bool(on_epoch(m))) if on_epoch else None)


# ---------------------------------------------------------------- final evaluation

class TrainedModels(NamedTuple):
    """What `train_final_models` trained, kept and registered."""

    evaluation: FinalEvaluation
    runs: tuple[FinalTraining, ...]             # every model, in training order
    folder: Path                                # where they are saved
    registered: tuple[str, str] | None          # (name, version) in the MLflow Model Registry


def train_final_models(source: StudySource, entries: Sequence[tuple[str, FrozenTrial]], *,
                       seeds: int, out: Path, command: str, device: str | None = None,
                       register: bool = True, with_predictions: bool = False,
                       log: Callable[[str], None] = print) -> TrainedModels:
    """Trains, tests, saves, logs and registers the final models of `entries` ((label, trial),
    best first), as `final_evaluation` describes.

    Args:
        source: the study and the config its trials ran under.
        entries: the configurations; the first one's first seed is the one registered.
        seeds: training runs per configuration (1 to 1000).
        out: the models go in `<out>/<study_name>/models/`.
        command: who trains (`search.report`, `search.train`, `search.api`), for the MLflow runs.
        device: where to train (default: the study's `device`).
        register: register the first entry's first model as `<study_name>-best` (tracking on).
        with_predictions: keep the reference model's test predictions (the report's figures).

    Raises:
        SearchError: bad `seeds`, nothing to train (no complete trial), a folder that cannot
            be written or a tracking store that cannot be used; all before any training.
    """
    SEEDS("seeds", seeds)  # the constraint search.report and search.train declare
    if not entries:
        raise SearchError(f"study '{source.study.study_name}' has no complete trial yet: "
                          "nothing to retrain.")
    config = source.config
    folder = out / source.study.study_name / MODELS_FOLDER
    writable_folder(folder, "out")
    tracking = None
    if config.tracking_enabled:  # else the models are saved as files only
        from search.tracking.model_registry import FinalModels  # mlflow imports take ~2 s

        tracking = FinalModels(config, source.study, command)
    runs: list[FinalTraining] = []

    def on_run(run: FinalTraining) -> None:
        if tracking is not None:
            tracking(run)
        runs.append(run)

    evaluation = final_evaluation(config, entries, seeds=seeds,
                                  device=resolve_device(device or config.device), save_dir=folder,
                                  on_run=on_run, log=log, with_predictions=with_predictions)
    registered = (tracking.register_best(entries[0][1].number, repeat=0)
                  if tracking is not None and register else None)
    return TrainedModels(evaluation, tuple(runs), folder, registered)


def final_evaluation(config: StudyConfig, entries: Sequence[tuple[str, FrozenTrial]], *,
                     seeds: int, device: torch.device, save_dir: Path, on_run: FinalTrainingHook,
                     log: Callable[[str], None], with_predictions: bool) -> FinalEvaluation:
    """Retrains each (label, trial) on train + validation for `config.epochs` with `seeds`
    seeds and evaluates each model once on the test set; each model is saved in `save_dir` as
    `trial-NNNN-seed-K.pt` (`search.training.classifier`) and handed to `on_run`. The first
    entry's first model is the reference for the confusion matrix and the t-SNE
    (`with_predictions`): chosen by validation rank, never by test accuracy.
    """
    spec = DATASETS[config.dataset]
    full_train = load_split(config.dataset, config.data_dir, train=True)
    test = load_split(config.dataset, config.data_dir, train=False)
    results, predictions = [], None
    for label, trial in entries:
        params = params_of(trial, config.space)
        accuracies, seconds = [], []
        for repeat in range(seeds):
            seed = repeat_seed(config.seed, trial.number, repeat, trial.user_attrs.get(TrialAttr.SEED))
            started = time.perf_counter()
            result = retrain(config, params, train_data=full_train, val_data=None, spec=spec,
                             seed=seed, device=device)
            seconds.append(time.perf_counter() - started)
            card = ModelCard(config.model, params, spec.name, spec.channels, spec.image_size,
                             spec.mean, spec.std, spec.classes, config.study_name, trial.number,
                             label, seed, config.epochs, len(full_train), trial.value,
                             test_accuracy=float("nan"), test_loss=float("nan"))
            model, card = tested_model(card, result, test, device)
            accuracies.append(card.test_accuracy)
            path = save_classifier(model, save_dir / model_file(trial.number, repeat))
            log(f"final: {label} (trial {trial.number}) seed {repeat + 1}/{seeds}: test accuracy "
                f"{card.test_accuracy:.4f} ({seconds[-1]:.0f} s), saved {path}")
            on_run(FinalTraining(card, repeat, seconds[-1], result.parameter_count,
                                 result.history, model, str(path)))
            if with_predictions and predictions is None:
                predictions = predict_test_set(result.model, test, spec, device, label,
                                               trial.number)
        results.append(FinalResult(label, trial.number, trial.value, tuple(accuracies),
                                   sum(seconds) / len(seconds)))
    return FinalEvaluation(results, predictions, seeds, config.epochs, len(full_train), len(test))


def tested_model(card: ModelCard, result: TrainResult, test: ImageSet,
                 device: torch.device) -> tuple[Classifier, ModelCard]:
    """The trained network as the `Classifier` a user will load, and its card with the test
    accuracy of that very model (see `classifier_from_state`)."""
    model = classifier_from_state(card, network_weights(result.model)).to(device)
    test_loss, test_accuracy = score(model, test)
    model.card = dataclasses.replace(card, test_accuracy=test_accuracy, test_loss=test_loss)
    return model, model.card


def _eval_loader(data: ImageSet, spec: DatasetSpec, device: torch.device) -> BatchLoader:
    """Evaluation batches of the size the device evaluates fastest at (see `Speed`)."""
    return make_loader(data, spec, device, batch_size=Speed.for_device(device).eval_batch_size,
                       train=False)


def predict_test_set(model: torch.nn.Module, test: ImageSet, spec: DatasetSpec,
                     device: torch.device, label: str, trial_number: int,
                     max_points: int = MAX_TSNE_POINTS, seed: int = 0) -> TestPredictions:
    """Predicted classes of all test images; penultimate features of a seeded subsample."""
    loader = _eval_loader(test, spec, device)
    predicted, labels = predict(model, loader, device)
    chosen = np.sort(np.random.default_rng(seed).permutation(len(test))[:max_points])
    index = torch.from_numpy(chosen)
    subset = ImageSet(test.images.index_select(0, index), test.labels.index_select(0, index))
    features, feature_labels = predict(model, _eval_loader(subset, spec, device), device,
                                       features=True)
    return TestPredictions(label, trial_number, labels.numpy(), predicted.numpy(),
                           features.numpy(), feature_labels.numpy())


# ---------------------------------------------------------------- one trial again (search.train)

class RetrainOutcome(NamedTuple):
    """What retraining a trial gave, per seed: validation accuracy (full=False) or test accuracy."""

    trial: FrozenTrial
    full: bool
    accuracies: tuple[float, ...]
    histories: tuple[tuple[EpochMetrics, ...], ...]   # per seed; empty when full=True
    folder: Path | None = None                        # where full=True saved the models


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
    """How the search left a trial, in words: its state and last validation accuracy."""
    state = trial.state.name.lower()
    if trial.state == TrialState.COMPLETE:
        epochs = trial.user_attrs.get(TrialAttr.EPOCHS_RUN, len(trial.intermediate_values))
        return f"{state}, validation accuracy {trial.value:.4f} after {epochs} epochs"
    if trial.intermediate_values:
        last = max(trial.intermediate_values)
        text = f"{state} after epoch {last} at validation accuracy {trial.intermediate_values[last]:.4f}"
    else:
        text = state
    reason = trial.user_attrs.get(TrialAttr.FAIL_REASON)
    return text + (f" ({reason})" if reason else "")


def retrain_trial(source: StudySource, number: int, *, seeds: int = 1, full: bool = False,
                  out: Path = Path("reports"), log: Callable[[str], None] = print) -> RetrainOutcome:
    """Trains trial `number`'s configuration `seeds` times for the study's full epoch budget;
    with `full`, on train + validation, tested and kept as `train_final_models` does (the
    models in `<out>/<study_name>/models/`)."""
    config, trial = source.config, find_trial(source, number)
    device = resolve_device(config.device)
    params = params_of(trial, config.space)
    log(f"Trial {trial.number} of study '{source.study.study_name}' ({describe(trial)}): "
        f"{config.model} on {config.dataset}, {config.epochs} epochs, device {device}")
    log(f"  params: {format_params(params, limit=99)}")
    if full:
        log("  full=true: training on train + validation and evaluating once on the test set.")
        final = train_final_models(source, [(f"trial {trial.number}", trial)], seeds=seeds,
                                   out=out, command="search.train", register=False, log=log)
        return RetrainOutcome(trial, True, final.evaluation.results[0].test_accuracies, (),
                              final.folder)
    data = load_search_data(config.dataset, config.data_dir, val_size=config.val_size,
                            seed=config.seed)
    accuracies, histories = [], []
    for repeat in range(seeds):
        seed = repeat_seed(config.seed, trial.number, repeat, trial.user_attrs.get(TrialAttr.SEED))

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
