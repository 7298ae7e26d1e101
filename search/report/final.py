"""Training a trial's configuration again, with the same trainer the search used.

Two uses: `search.train` reproduces a trial (train split, validation split, the trial's own seed),
and the report's final evaluation retrains the best configurations on the whole training set
(train + validation) for the full epoch budget with several seeds and evaluates each model once
on the test set. This module is the only one that loads the test split.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from optuna.trial import FrozenTrial

from search.augment import BatchLoader
from search.config import StudyConfig
from search.data import DATASETS, DatasetSpec, ImageSet, load_split
from search.objective import trial_seed
from search.report.source import trial_params
from search.trainer import EpochMetrics, Speed, TrainResult, evaluate, make_loader, predict, train

# Class names where the data set has well-known ones; others are numbered.
CLASS_NAMES = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
}
MAX_TSNE_POINTS = 1000
# Seeds of the repeats of one configuration are this far apart, so they never meet another
# trial's seed (trial seeds are consecutive).
SEED_STRIDE = 1_000_003


def class_names(dataset: str) -> tuple[str, ...]:
    return CLASS_NAMES.get(dataset, tuple(str(i) for i in range(DATASETS[dataset].num_classes)))


def repeat_seed(study_seed: int, trial_number: int, repeat: int) -> int:
    """Repeat 0 is the trial's own seed (so it reproduces the trial); others are new seeds."""
    return trial_seed(study_seed, trial_number) + SEED_STRIDE * repeat


def retrain(config: StudyConfig, params: dict[str, Any], *, train_data: ImageSet,
            val_data: ImageSet | None, spec: DatasetSpec, seed: int, device: torch.device,
            on_epoch: Callable[[EpochMetrics], bool | None] | None = None) -> TrainResult:
    """One training run for the study's full epoch budget (no pruning)."""
    return train(config.model, params, train_data=train_data, val_data=val_data, spec=spec,
                 epochs=config.epochs, seed=seed, device=device,
                 on_epoch=(lambda m: bool(on_epoch(m))) if on_epoch else None)


# ---------------------------------------------------------------- final evaluation

class FinalRun(NamedTuple):
    """One final training run: a configuration, a seed, its test accuracy. Passed to the
    `on_run` hook (e.g. to log it to MLflow, tagged as a final evaluation)."""

    study_name: str
    label: str                                  # "rank 1", "baseline", ...
    trial_number: int
    repeat: int
    seed: int
    params: dict[str, Any]
    epochs: int
    test_accuracy: float
    test_loss: float
    train_seconds: float
    parameter_count: int
    history: list[EpochMetrics]


FinalRunHook = Callable[[FinalRun], None]


class FinalResult(NamedTuple):
    """Test accuracy of one configuration over its seeds."""

    label: str
    trial_number: int
    val_accuracy: float | None                  # what the search measured
    test_accuracies: tuple[float, ...]
    train_seconds: float                        # mean per run

    @property
    def mean(self) -> float:
        return statistics.fmean(self.test_accuracies)

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds; None with a single seed."""
        return statistics.stdev(self.test_accuracies) if len(self.test_accuracies) > 1 else None


class TestPredictions(NamedTuple):
    """The reference model's view of the test set: for the confusion matrix and the t-SNE."""

    label: str
    trial_number: int
    labels: np.ndarray                          # true class of every test image
    predicted: np.ndarray
    features: np.ndarray                        # penultimate features of a subsample
    feature_labels: np.ndarray


class FinalEvaluation(NamedTuple):
    results: list[FinalResult]
    predictions: TestPredictions | None
    seeds: int
    epochs: int
    train_images: int
    test_images: int


def final_evaluation(config: StudyConfig, entries: Sequence[tuple[str, FrozenTrial]], *,
                     seeds: int, device: torch.device, on_run: FinalRunHook | None = None,
                     log: Callable[[str], None] = print,
                     with_predictions: bool = True) -> FinalEvaluation:
    """Retrains each (label, trial) on train + validation for `config.epochs` with `seeds`
    seeds and evaluates each model once on the test set. The first entry's first model is the
    reference for the confusion matrix and the t-SNE (`with_predictions`): chosen by validation
    rank, never by test accuracy.
    """
    spec = DATASETS[config.dataset]
    full_train = load_split(config.dataset, config.data_dir, train=True)
    test = load_split(config.dataset, config.data_dir, train=False)
    test_loader = _eval_loader(test, spec, device)
    results, predictions = [], None
    for label, trial in entries:
        params = trial_params(trial, config)
        accuracies, seconds = [], []
        for repeat in range(seeds):
            seed = repeat_seed(config.seed, trial.number, repeat)
            started = time.perf_counter()
            result = retrain(config, params, train_data=full_train, val_data=None, spec=spec,
                             seed=seed, device=device)
            seconds.append(time.perf_counter() - started)
            test_loss, test_accuracy = evaluate(result.model, test_loader, device)
            accuracies.append(test_accuracy)
            log(f"final: {label} (trial {trial.number}) seed {repeat + 1}/{seeds}: "
                f"test accuracy {test_accuracy:.4f} ({seconds[-1]:.0f} s)")
            if on_run is not None:
                on_run(FinalRun(config.study_name, label, trial.number, repeat, seed, params,
                                config.epochs, test_accuracy, test_loss, seconds[-1],
                                result.parameter_count, result.history))
            if with_predictions and predictions is None:
                predictions = predict_test_set(result.model, test, spec, device, label,
                                               trial.number)
        results.append(FinalResult(label, trial.number, trial.value, tuple(accuracies),
                                   statistics.fmean(seconds)))
    return FinalEvaluation(results, predictions, seeds, config.epochs, len(full_train), len(test))


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
    sub_loader = _eval_loader(subset, spec, device)
    features, feature_labels = predict(model, sub_loader, device, features=True)
    return TestPredictions(label, trial_number, labels.numpy(), predicted.numpy(),
                           features.numpy(), feature_labels.numpy())


def confusion(predictions: TestPredictions, num_classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(predictions.labels, predictions.predicted, labels=range(num_classes))


def tsne_embedding(predictions: TestPredictions, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of the penultimate features (scikit-learn; PCA init for a stable layout)."""
    from sklearn.manifold import TSNE

    n = len(predictions.features)
    perplexity = float(min(30, max(2, (n - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                learning_rate="auto").fit_transform(predictions.features)
