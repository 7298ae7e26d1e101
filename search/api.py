"""The Python API, for notebooks and scripts: the commands as functions, with the same checks
and the same files, stores and runs. A mistake raises `search.SearchError` with the message the
command line would print (naming the key and what is allowed), before anything is written.

Example:
    >>> import search
    >>> study = search.run_study("cnn3", dataset="fake", epochs=3, n_trials=6)  # doctest: +SKIP
    >>> search.best_config(study)                         # the best trial's parameters
    >>> [best] = search.retrain(study, top=1, seeds=1)    # train+val, tested, saved, registered
    >>> model = search.load_model(best.registered or best.path)
    >>> search.predict(model, "my_pictures/")             # top-3 classes of each picture
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import optuna

from search.config.command_keys import PREDICT
from search.config.errors import SearchError
from search.config.keys import Whole
from search.config.settings import StudyConfig, load_config
from search.config.urls import is_model_uri, masked, store_url
from search.storage.studies import quiet_optuna

__all__ = ["Prediction", "RetrainedModel", "SearchError", "Study", "best_config", "load_model",
           "open_study", "predict", "retrain", "run_study"]

Function = TypeVar("Function", bound=Callable[..., Any])


def _user_errors(function: Function) -> Function:
    """A `SearchError` leaves the API as one short exception, not a chain of internal frames,
    with any URL password in its message masked."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except SearchError as error:
            raise SearchError(masked(str(error))) from None
    return wrapper  # type: ignore[return-value]


def _word(key: str, value: Any) -> str:
    """A Python value as the `key=value` word the command line takes (values are YAML)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, (list, tuple)):
        text = "[" + ",".join(_word("", v)[1:] for v in value) + "]"
    else:
        text = str(value)
    return f"{key}={text}"


class Study:
    """A study in its storage, with the config its trials ran under.

    Attributes:
        config: the resolved `StudyConfig` (model, dataset, space, storage, ...).
        optuna: the `optuna.Study` itself (`trials_dataframe()`, `best_trial`, ...).
    """

    def __init__(self, source: Any) -> None:
        self._source = source
        self.config: StudyConfig = source.config
        self.optuna: optuna.Study = source.study

    @property
    def name(self) -> str:
        return self.optuna.study_name

    def __repr__(self) -> str:
        trials = self.optuna.get_trials(deepcopy=False)
        return (f"Study({self.name!r}: {self.config.model} on {self.config.dataset}, "
                f"{len(trials)} trials in {self.config.storage})")


@_user_errors
def run_study(study: str, overrides: Mapping[str, Any] | None = None, **settings: Any) -> Study:
    """Runs (or resumes) a study, exactly as `python -m search.run study=NAME key=value ...`.

    Args:
        study: a study file under `studies/` (`"cnn3"`) or a path to one.
        overrides: dotted keys the keyword form cannot spell: `{"space.lr.low": 1e-4}`.
        **settings: top-level keys: `dataset="fake"`, `epochs=3`, `n_trials=10`, `workers=2`, ...

    Returns:
        The study, opened for reading once the run has ended.

    Raises:
        SearchError: a bad key or value, an unreachable store, ... (nothing written), or a run
            that stopped early (Ctrl-C; call again to resume).
    """
    from search.run import run  # PyTorch loads here, not on `import search`

    words = [f"study={study}", *(_word(k, v) for k, v in {**(overrides or {}), **settings}.items())]
    config = load_config(words)
    quiet_optuna()
    status = run(config, words)
    if status != 0:
        raise SearchError(f"the run of study '{config.study_name}' ended with status {status} "
                          "(see above); call run_study again with the same arguments to resume.")
    return open_study(config.study, storage=config.storage.raw, study_name=config.study_name)


@_user_errors
def open_study(study: str, *, storage: str | None = None, study_name: str | None = None,
               **local: Any) -> Study:
    """Opens a study for reading, as `search.report` does (nothing is written).

    Args:
        study: the study file it ran from.
        storage: its storage URL (default: `$SEARCH_STORAGE`, else the local SQLite file).
        study_name: its name in the storage (default: the file's name).
        **local: `data_dir`, `device` or `tracking_uri` where they differ on this machine.
    """
    from search.storage.reading import open_source

    quiet_optuna()
    location = {"study": study, **local}
    if storage is not None:
        location["storage"] = storage
    if study_name is not None:
        location["study_name"] = study_name
    return Study(open_source(location))


@_user_errors
def best_config(study: Study) -> dict[str, Any]:
    """The best complete trial's full parameters (fixed ones included), as a trial trained with."""
    from search.analysis.tables import top_trials
    from search.storage.trials import params_of

    best = top_trials(study.optuna, 1)
    if not best:
        raise SearchError(f"study '{study.name}' has no complete trial yet.")
    return params_of(best[0], study.config.space)


class RetrainedModel(NamedTuple):
    """One final model of `retrain`."""

    label: str                 # "rank 1", ...
    trial_number: int
    seed: int
    test_accuracy: float
    path: Path                 # the saved model (`load_model(path)`)
    registered: str | None     # "models:/<study>-best/N" for the registered one


@_user_errors
def retrain(study: Study, *, top: int = 1, seeds: int = 1, device: str | None = None,
            out: str | Path = "reports", register: bool = True) -> list[RetrainedModel]:
    """Retrains the `top` best configurations on train + validation, tests each model once, and
    keeps them: saved under `<out>/<study_name>/models/`, logged to MLflow when the study's
    tracking is on, and rank 1's first seed registered as `<study_name>-best` (`register`), as
    `search.report retrain=topN` does (without writing the report).
    """
    from search.analysis.tables import top_trials
    from search.runner.final_models import train_final_models

    Whole(1)("top", top)
    entries = [(f"rank {rank}", t) for rank, t in enumerate(top_trials(study.optuna, top), 1)]
    final = train_final_models(study._source, entries, seeds=seeds, out=Path(out),
                               command="search.api", device=device, register=register)
    registered = "models:/{}/{}".format(*final.registered) if final.registered else None
    first = (entries[0][1].number, 0)  # rank 1's first seed: the registered one
    return [RetrainedModel(run.card.label, run.card.trial_number, run.card.seed,
                           run.card.test_accuracy, Path(run.path).resolve(),
                           registered if (run.card.trial_number, run.repeat) == first else None)
            for run in final.runs]


@_user_errors
def load_model(model: str | Path, *, device: str = "cpu", tracking_uri: str | None = None):
    """A final model, ready to use: `model(uint8_images)` gives logits, `model.card` says what it
    is (classes, normalisation, study, trial, test accuracy).

    Args:
        model: a saved file (`reports/cnn3/models/trial-0007-seed-1.pt`) or an MLflow model URI
            (`models:/cnn3-best/1`, `models:/cnn3-best@champion`, `runs:/<run_id>/model`).
        device: where to put it (`auto`, `cpu`, `cuda`, `cuda:1`; any other word, or CUDA this
            machine does not have, is a SearchError). Give the model its images there
            (`model.device`).
        tracking_uri: the MLflow store of a model URI (default: `$MLFLOW_TRACKING_URI`, else the
            local SQLite store). It must exist: a store that is not there is a `SearchError`
            naming `tracking_uri=`, never created.

    Returns:
        A `search.training.classifier.Classifier` (a `torch.nn.Module`), in eval mode.
    """
    from search.training.classifier import load_classifier
    from search.training.loop import resolve_device

    place = resolve_device(device)
    text = str(model)
    if is_model_uri(text):
        from search.tracking.model_registry import load_logged_model

        uri = store_url("tracking_uri", tracking_uri)
        if uri.is_off:
            raise SearchError(f"model={text}: an MLflow model URI needs a tracking store; "
                              "give tracking_uri=.")
        return load_logged_model(text, uri, place)
    return load_classifier(text, place)


class Prediction(NamedTuple):
    image: str                               # file name, or `file[i]` inside an idx/CIFAR file
    classes: list[tuple[str, float]]         # (class, probability), most probable first


@_user_errors
def predict(model: Any, images: str | Path, *, top_k: int = 3) -> list[Prediction]:
    """The `top_k` most probable classes of each image in `images` (a folder of PNG/JPEG, one
    picture, an idx file or a CIFAR batch file); `model` is a loaded model or what `load_model`
    takes."""
    from search.training.classifier import Classifier, top_classes
    from search.training.image_files import read_images

    PREDICT["top_k"].check("top_k", top_k)
    if not isinstance(model, Classifier):
        model = load_model(model)
    card = model.card
    pixels, names = read_images(images, channels=card.channels, image_size=card.image_size)
    return [Prediction(name, classes) for name, classes in zip(names, top_classes(model, pixels, top_k))]
