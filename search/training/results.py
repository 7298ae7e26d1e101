"""What training produces and everyone downstream reads: per-epoch metrics, a training run's
result, a final (test-set) run and a final evaluation, and the seeds that make each reproducible.

Plain data with no behaviour beyond a few derived values, torch-free, so the objective, the
trackers, retraining and the report all share one definition of each.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

# Seeds of the repeats of one configuration are this far apart, so they never meet another
# trial's seed (trial seeds are consecutive).
SEED_STRIDE = 1_000_003


def trial_seed(study_seed: int, trial_number: int) -> int:
    """Each trial gets its own reproducible seed from the study seed and its number."""
    return study_seed * 100_003 + trial_number


def repeat_seed(study_seed: int, trial_number: int, repeat: int,
                recorded: int | None = None) -> int:
    """Repeat 0 is the trial's own seed (so it reproduces the trial); others are new seeds.
    `recorded` is the seed the trial recorded, which a retry inherits from the trial it repeats."""
    base = trial_seed(study_seed, trial_number) if recorded is None else recorded
    return base + SEED_STRIDE * repeat


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int                       # 1-based: the number of epochs trained so far
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    lr: float
    epoch_seconds: float
    images_per_second: float

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if v is not None and k != "epoch"}


def best_of(history: Sequence[EpochMetrics]) -> EpochMetrics | None:
    """The epoch with the highest validation accuracy (the first of ties); None without one."""
    scored = [m for m in history if m.val_accuracy is not None and math.isfinite(m.val_accuracy)]
    return max(scored, key=lambda m: m.val_accuracy) if scored else None


@dataclass
class TrainResult:
    model: Any                       # the trained torch module
    history: list[EpochMetrics] = field(default_factory=list)
    parameter_count: int = 0
    stopped_early: bool = False

    @property
    def best_epoch(self) -> int | None:
        best = best_of(self.history)
        return best.epoch if best else None


def mean_and_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation over seeds; the std is None with a single seed."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


MODEL_FORMAT = 1  # bumped when a saved model's layout changes; `search.load_model` checks it


@dataclass(frozen=True)
class ModelCard:
    """Everything a saved final model needs besides its weights to be used and trusted: how to
    rebuild the network, how to feed it (image size, channels, normalisation), what its outputs
    mean (class names), and where it came from (study, trial, seed, accuracies).

    Plain JSON-able values, so the card is readable without PyTorch: it is saved beside the
    weights, logged to MLflow as the model's metadata and tags, and printed by `search.predict`.
    """

    model: str
    params: dict[str, Any]
    dataset: str
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    study_name: str
    trial_number: int
    label: str                                  # "rank 1", "baseline", ...
    seed: int
    epochs: int
    train_images: int
    val_accuracy: float | None                  # what the search measured (validation split)
    test_accuracy: float                        # measured on the saved model, as loaded
    test_loss: float
    format: int = MODEL_FORMAT

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelCard:
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()
                 if k in cls.__dataclass_fields__}
        return cls(**known)

    def describe(self) -> str:
        return (f"{self.model} on {self.dataset} ({self.image_size}x{self.image_size}, "
                f"{self.channels} channel(s), {len(self.classes)} classes): study "
                f"'{self.study_name}' trial {self.trial_number} ({self.label}), seed {self.seed}, "
                f"test accuracy {self.test_accuracy:.4f}")


class FinalTraining(NamedTuple):
    """One final training run (train + validation, one test evaluation), passed to the `on_run`
    hook of a final evaluation (e.g. to log it and its model to MLflow)."""

    card: ModelCard                             # the configuration, seed and test accuracy
    repeat: int                                 # 0 for the first seed
    train_seconds: float
    parameter_count: int
    history: list[EpochMetrics]
    model: Any                                  # the `search.training.classifier.Classifier`
    path: str | None                            # where it was saved, if it was


MODELS_FOLDER = "models"  # where final models are saved: within <out>/<study_name>/, beside the report


class FinalResult(NamedTuple):
    """Test accuracy of one configuration over its seeds."""

    label: str
    trial_number: int
    val_accuracy: float | None                  # what the search measured
    test_accuracies: tuple[float, ...]
    train_seconds: float                        # mean per run

    @property
    def mean(self) -> float:
        return mean_and_std(self.test_accuracies)[0]

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds; None with a single seed."""
        return mean_and_std(self.test_accuracies)[1]


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
