"""The Python API (`import search`): a study run in this process, its best configuration,
retrained, registered and loaded back with the accuracy it recorded; and bad arguments refused
as the command line refuses them, as one short `SearchError`, with nothing written."""

from __future__ import annotations

import optuna
import pytest
from helpers import SMALL_CNN_CHOICES, one_thread

import search
from search.analysis.tables import top_trials
from search.storage.trials import count_finished, params_of
from search.training.classifier import score
from search.training.images import load_split

pytestmark = pytest.mark.slow
SMALL_SPACE = {f"space.{name}.choices": values for name, values in SMALL_CNN_CHOICES.items()}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory with no storage or tracking store named by the environment:
    the API's defaults (`mlruns/optuna.db`, `mlruns/mlflow.db`) land here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEARCH_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_run_best_retrain_load_predict_in_one_process(workdir):
    with one_thread():
        study = search.run_study("cnn3", SMALL_SPACE, dataset="fake", device="cpu", epochs=2,
                                 n_trials=3)
        assert count_finished(study.optuna) == 3 and (workdir / "mlruns/optuna.db").is_file()
        best = top_trials(study.optuna, 1)[0]
        assert search.best_config(study) == params_of(best, study.config.space)
        again = search.open_study("cnn3")  # the same study, read back from the default storage
        assert again.optuna.best_trial.number == best.number

        [model_info] = search.retrain(study, top=1, seeds=1)
        assert model_info.trial_number == best.number and model_info.label == "rank 1"
        assert model_info.path == workdir / f"reports/cnn3/models/trial-{best.number:04d}-seed-1.pt"
        assert model_info.registered == "models:/cnn3-best/1"

        test = load_split("fake", "data", train=False)
        for where in (model_info.registered, model_info.path):
            model = search.load_model(where)
            assert score(model, test)[1] == model_info.test_accuracy
            assert model.card.trial_number == best.number

        # A second retrain is a second version of the registered model.
        [second] = search.retrain(study, top=1, seeds=1)
        assert second.registered == "models:/cnn3-best/2"


@pytest.mark.parametrize("settings, message", [
    ({"epochs": 0}, "epochs=0: expected a whole number"),
    ({"learning_rate": 0.1}, "unknown key 'learning_rate'"),
    ({"dataset": "imagenet"}, "imagenet"),
    ({"overrides": {"space.lr.low": 1.0, "space.lr.high": 0.1}}, "space.lr"),
])
def test_a_bad_argument_is_one_short_error_and_writes_nothing(workdir, settings, message):
    with pytest.raises(search.SearchError, match=message) as raised:
        search.run_study("cnn3", **settings)
    # One exception, raised from the API's own frame: no chain, no internal frames.
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    frames = [str(entry.path) for entry in raised.traceback]
    assert not [f for f in frames if "/search/config/" in f or "/search/run" in f], frames
    assert list(workdir.iterdir()) == []


def test_load_model_and_retrain_refuse_what_they_cannot_use(workdir):
    with pytest.raises(search.SearchError, match="no such file"):
        search.load_model(workdir / "missing.pt")
    with pytest.raises(search.SearchError, match="m.db: no such MLflow store"):
        search.load_model("models:/nothing-best/1", tracking_uri=f"sqlite:///{workdir}/m.db")
    storage = f"sqlite:///{workdir}/other.db"
    optuna.create_study(study_name="other", storage=storage)
    with pytest.raises(search.SearchError, match="no study named 'cnn3'.*Studies there: other"):
        search.open_study("cnn3", storage=storage)
    study = search.open_study("cnn3", storage=storage, study_name="other")
    for arguments, message in (({"top": 0}, "top=0"), ({"seeds": 1.5}, "seeds=1.5"),
                               ({}, "no complete trial yet")):
        with pytest.raises(search.SearchError, match=message):
            search.retrain(study, **arguments)
