"""The final models in MLflow: each final training run (`search.runner.final_models`, for the
report's `retrain=topN`, `search.train full=true` and `search.retrain()`) as a run with its
metrics and its model (`mlflow.pytorch.log_model`, with a signature and an input example), and
the study's rank-1 model registered in the Model Registry as `<study_name>-best`, a new version
per report, tagged with its test accuracy and trial. Loading a logged or registered model back
(`models:/cnn3-best/1`, `runs:/...`) is here too.

The runs are written with `MlflowClient` (explicit run ids, as `trial_runs` does); only the model
itself goes through `mlflow.pytorch`, which reads the process's tracking URI, so that URI is set
for the call and put back after (`_tracking`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import optuna
import torch
from mlflow.entities import Metric, Param
from mlflow.models import ModelSignature
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from mlflow.types import Schema, TensorSpec

from search.config.errors import SearchError
from search.config.settings import StudyConfig
from search.config.urls import StoreUrl, masked
from search.storage.trials import StudyAttr
from search.tracking.run_values import GIT_COMMIT_TAG, git_commit, now_ms, param_value
from search.tracking.stores import check_existing_tracking, check_tracking, short_reason
from search.tracking.study_run import PARENT_TAG, ROLE_TAG, open_experiment
from search.training.classifier import (
    Classifier,
    load_classifier,
    model_file,
    save_classifier,
)
from search.training.results import FinalTraining, ModelCard

MODEL_NAME = "model"                       # the logged model's name, within its run
REGISTERED_SUFFIX = "-best"                # `<study_name>-best` in the Model Registry
# What the registered version carries as tags, from the model's card.
VERSION_TAGS = ("study_name", "trial_number", "label", "seed", "test_accuracy", "val_accuracy",
                "model", "dataset", "epochs")


def registered_name(study_name: str) -> str:
    return f"{study_name}{REGISTERED_SUFFIX}"


def _tracking(uri: StoreUrl) -> contextlib.AbstractContextManager:
    """`mlflow.pytorch` and `mlflow.register_model` read the process-wide tracking URI (and the
    registry follows it unless set apart); point it at `uri` for one call, then put back exactly
    what was there, unset included (a notebook's own setting survives). A model is a few small
    files: a progress bar per upload or download would be noise in a command's output."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return _use_tracking_uri(uri.raw)


def signature(card: ModelCard) -> ModelSignature:
    """uint8 pixels (N, C, H, W) in, float32 logits (N, classes) out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, card.channels, card.image_size,
                                                        card.image_size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(card.classes)))]))


def log_classifier(model: Classifier, saved: Path, run_id: str, uri: StoreUrl) -> str:
    """Logs `model` as the run's PyTorch model, with the saved file `saved` inside it; returns
    the logged model's URI (`models:/m-...`).

    MLflow stores the model as a `torch.export` graph ("pt2", its default: loading it runs no
    pickled code and needs neither this package nor its classes), so
    `mlflow.pytorch.load_model` works anywhere PyTorch does. The file `search.load_model` reads,
    with the model's card, travels inside as `extra_files/`. The requirements are given, not
    inferred: inferring them loads the model in a subprocess.
    """
    card = model.card
    example = np.zeros((2, card.channels, card.image_size, card.image_size), dtype=np.uint8)
    # Inside the run (reopened for the call) the logged model is filed in the run's experiment.
    with _tracking(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model.to("cpu"), name=MODEL_NAME, signature=signature(card), input_example=example,
            extra_files=[str(saved)], metadata={"search_model_card": card.as_dict()},
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"numpy=={np.__version__}"])
    return info.model_uri


class FinalModels:
    """The `on_run` hook of a final evaluation: logs each final training run and its model to
    the study's experiment, nested under the study's parent run and tagged
    `search.role=final_evaluation` (so final test accuracies sit next to the search without
    being mistaken for trials); `register_best` then registers the rank-1 model.

    Args:
        config: the study's config; tracking must be on.
        study: the study, for its parent run.
        command: the command that trains (`search.report`, `search.train`), for the runs' source.
    """

    def __init__(self, config: StudyConfig, study: optuna.Study, command: str = "search.report") -> None:
        check_tracking(config.tracking_uri, config.study_name)  # refuses a deleted experiment
        self.config, self.command = config, command
        self.client, self.experiment_id = open_experiment(config)
        self.parent = study.user_attrs.get(StudyAttr.MLFLOW_PARENT_RUN_ID)
        self.commit = git_commit()
        self.logged: dict[tuple[int, int], tuple[str, str, ModelCard]] = {}  # (trial, repeat) ->

    def __call__(self, run: FinalTraining) -> None:
        """Logs one final training run and its model. A tracking store that fails here costs
        the MLflow copy only, never the training: a warning, and the saved file stays."""
        try:
            self._log(run)
        except Exception as error:  # noqa: BLE001 - hours of training outweigh a log entry
            where = f"; the model is saved in {run.path}" if run.path else ""
            print(f"warning: could not log the final model of trial {run.card.trial_number} "
                  f"(seed {run.repeat + 1}) to MLflow ({masked(short_reason(error))}){where}.",
                  file=sys.stderr, flush=True)

    def _log(self, run: FinalTraining) -> None:
        card = run.card
        tags = {ROLE_TAG: "final_evaluation", "study_name": card.study_name,
                "trial_number": str(card.trial_number), "label": card.label,
                "repeat": str(run.repeat), "torch_version": torch.__version__,
                "mlflow.source.name": self.command}
        if self.parent:
            tags[PARENT_TAG] = self.parent
        if self.commit:
            tags[GIT_COMMIT_TAG] = self.commit
        created = self.client.create_run(
            self.experiment_id, tags=tags,
            run_name=f"final-trial-{card.trial_number:04d}-seed-{card.seed}")
        run_id, now = created.info.run_id, now_ms()
        params = {"model": card.model, "dataset": card.dataset, "epochs": card.epochs,
                  "seed": card.seed, **card.params}
        metrics = [Metric(k, float(v), now, m.epoch) for m in run.history for k, v in m.as_dict().items()]
        metrics += [Metric(name, float(value), now, card.epochs) for name, value in (
            ("test_accuracy", card.test_accuracy), ("test_loss", card.test_loss),
            ("train_seconds", run.train_seconds), ("parameter_count", run.parameter_count))]
        try:
            self.client.log_batch(run_id, params=[Param(k, param_value(v)) for k, v in params.items()],
                                  metrics=metrics)
            with tempfile.TemporaryDirectory() as folder:
                saved = Path(run.path) if run.path else save_classifier(
                    run.model, Path(folder) / model_file(card.trial_number, run.repeat))
                model_uri = log_classifier(run.model, saved, run_id, self.config.tracking_uri)
        except Exception:
            with contextlib.suppress(Exception):  # the store may be the very thing that failed
                self.client.set_terminated(run_id, "FAILED", end_time=now_ms())
            raise
        self.client.set_terminated(run_id, "FINISHED", end_time=now_ms())
        self.logged[(card.trial_number, run.repeat)] = (run_id, model_uri, card)

    def register_best(self, trial_number: int, repeat: int = 0) -> tuple[str, str] | None:
        """Registers the logged model of (trial, repeat) as a new version of `<study>-best`.

        Returns:
            The registered model's name and the new version number; None (with a warning) when
            that model could not be logged or registered.
        """
        if (trial_number, repeat) not in self.logged:
            return None  # its logging failed, and said so
        run_id, model_uri, card = self.logged[(trial_number, repeat)]
        name = registered_name(self.config.study_name)
        values = card.as_dict()
        tags = {key: param_value(values[key]) for key in VERSION_TAGS}
        try:
            with _tracking(self.config.tracking_uri):
                version = mlflow.register_model(model_uri, name, tags=tags)
            self.client.update_registered_model(
                name, description=f"The best configuration of study '{self.config.study_name}' "
                f"({card.model} on {card.dataset}), retrained on train + validation by "
                f"{self.command}; each report with retrain=topN adds a version.")
        except Exception as error:  # noqa: BLE001 - the model is logged and saved all the same
            print(f"warning: could not register {model_uri} as '{name}' "
                  f"({masked(short_reason(error))}).", file=sys.stderr, flush=True)
            return None
        return name, str(version.version)


# ---------------------------------------------------------------- loading

def load_logged_model(model_uri: str, tracking: StoreUrl, device: str | torch.device = "cpu") -> Classifier:
    """A model logged by `FinalModels` (or registered from one), through MLflow: its saved file
    (`extra_files/`) is downloaded and loaded as `search.training.classifier.load_classifier`
    loads any saved model, so the card comes back with it.

    Nothing is created on the way: a tracking store that is not there is refused, not made.

    Raises:
        SearchError: the tracking store does not exist or cannot be reached, the model or
            version does not exist, or it is not a model of this package.
    """
    check_existing_tracking(tracking)
    try:
        with _tracking(tracking), tempfile.TemporaryDirectory() as folder:
            local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=folder))
            saved = sorted((local / "extra_files").glob("*.pt"))
            if not saved:
                raise SearchError(f"model={model_uri}: not a model logged by search (it has no "
                                  "saved model file in extra_files/); load it with "
                                  "mlflow.pytorch.load_model instead.")
            return load_classifier(saved[0], device)
    except SearchError:
        raise
    except Exception as error:  # noqa: BLE001 - unknown name/version, store gone
        raise SearchError(f"model={model_uri}: cannot be loaded from tracking_uri={tracking} "
                          f"({masked(short_reason(error))}).") from None
