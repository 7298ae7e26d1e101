"""What makes a search beat hand-tuning: per-optimizer ranges, the decoupled parametrisation,
a model-size budget, warm starts, and MLflow opening on the training runs."""

from __future__ import annotations

import optuna
import pytest
import torch
from helpers import FAKE, SMALL_CNN, SMALL_CNN_CHOICES, space_choices
from mlflow import MlflowClient
from optuna.trial import TrialState

from search.config.errors import SearchError
from search.config.settings import load_config
from search.config.space import suggest
from search.runner.objective import Objective, StopSignal
from search.runner.preflight import prepare
from search.runner.process import reserve_and_run
from search.storage.studies import open_study
from search.storage.trials import TrialAttr, count_finished
from search.training.loop import build_optimizer
from search.training.models import build_model, model_size


class RecordingTrial(optuna.trial.FixedTrial):
    """A FixedTrial that remembers the range each float was suggested from."""

    def __init__(self, params):
        super().__init__(params)
        self.ranges = {}

    def suggest_float(self, name, low, high, *, step=None, log=False):
        self.ranges[name] = (low, high, log)
        return super().suggest_float(name, low, high, step=step, log=log)


@pytest.mark.parametrize("optimizer, expected", [
    ("sgd", (1e-2, 0.3)), ("adam", (1e-4, 3e-3)), ("rmsprop", (1e-5, 1e-3)),
])
def test_each_optimizer_samples_lr_from_its_own_range(optimizer, expected):
    config = load_config(["study=cnn3"])
    params = {"optimizer": optimizer, "lr": expected[0], "weight_decay": 1e-4, "momentum": 0.9,
              "nesterov": False, "beta1": 0.9, "beta2": 0.999, "alpha": 0.99, "batch_size": 64,
              "schedule": "none", "augment": False, "kernel_size_1": 3, "kernel_size_2": 3,
              "kernel_size_3": 3, "width_1": 32, "width_2": 64, "width_3": 128, "hidden_1": 256,
              "hidden_2": 0, "dropout": 0.1, "activation": "relu"}
    trial = RecordingTrial(params)
    suggest(trial, config.space)
    assert trial.ranges["lr"] == (*expected, True)
    # and a value of one optimizer's range is refused for another's (as a baseline would be)
    lr = next(spec for spec in config.space if spec.name == "lr")
    assert lr.contains(0.2, {"optimizer": "sgd"}) and not lr.contains(0.2, {"optimizer": "adam"})


def test_a_real_sampler_keeps_every_lr_inside_its_optimizers_range():
    config = load_config(["study=cnn3"])
    lr = next(spec for spec in config.space if spec.name == "lr")
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    for _ in range(25):
        trial = study.ask()
        params = suggest(trial, config.space)
        low, high = lr.bounds(params)
        assert low <= params["lr"] <= high
        study.tell(trial, float(params["lr"]))


def test_the_decoupled_parametrisation_scales_lr_and_weight_decay():
    model = build_model("cnn3", {"width_1": 8}, in_channels=3, image_size=32, num_classes=10)
    params = {"optimizer": "sgd", "lr": 2.0, "weight_decay": 5e-4, "batch_size": 256}
    plain = build_optimizer(model, params).param_groups[0]
    decoupled = build_optimizer(model, {**params, "decoupled": True}).param_groups[0]
    assert plain["lr"] == 2.0 and plain["weight_decay"] == 5e-4
    assert decoupled["lr"] == pytest.approx(2.0 * 256 / 1024)  # lr per 1024 examples
    # The decay per step (lr x weight_decay in torch) is weight_decay per 1024 examples, with
    # no dependence on lr.
    assert decoupled["lr"] * decoupled["weight_decay"] == pytest.approx(5e-4 * 256 / 1024)


# ---------------------------------------------------------------- the size budget

BUDGET_SPACE = [*FAKE, "device=cpu", "tracking_uri=none", "epochs=1", "pruner=none", "baselines=[]",
                *space_choices({**SMALL_CNN_CHOICES, "width_3": [8, 256], "hidden_1": [16, 512]})]


def test_a_budget_below_the_smallest_model_is_refused_before_any_study(tmp_path):
    config = load_config([*BUDGET_SPACE, "max_params=1000", f"storage=sqlite:///{tmp_path}/o.db"])
    with pytest.raises(SearchError, match="max_params=1,000: the smallest model of this space has"):
        prepare(config)
    assert not (tmp_path / "o.db").exists()


def test_an_over_budget_model_is_never_trained_nor_counted(tmp_path, monkeypatch, fake_data):
    spec = fake_data.spec
    small = model_size("cnn3", {"width_1": 8, "width_2": 8, "width_3": 8, "hidden_1": 16}, spec)
    large = model_size("cnn3", {"width_1": 8, "width_2": 8, "width_3": 256, "hidden_1": 512}, spec)
    budget = (small + large) // 2
    config = load_config([*BUDGET_SPACE, f"max_params={budget}", "n_trials=4", "sampler=tpe",
                          "sampler.n_startup_trials=2", f"storage=sqlite:///{tmp_path}/o.db"])
    trained = []
    from search.runner import objective as objective_module

    real_train = objective_module.train

    def spy(model_name, params, **kwargs):
        trained.append(model_size(model_name, params, spec))
        return real_train(model_name, params, **kwargs)

    monkeypatch.setattr(objective_module, "train", spy)
    study, _, _ = open_study(config)
    objective = Objective(config, fake_data, torch.device("cpu"))
    from datetime import datetime

    reserve_and_run(study, objective, config, stop=StopSignal(), callbacks=[], since=datetime.now())
    trials = study.get_trials()
    over = [t for t in trials if TrialAttr.OVER_BUDGET in t.user_attrs]
    assert trained and max(trained) <= budget  # nothing over the budget was trained
    assert count_finished(study) == 4  # the over-budget trials do not count
    assert len(trials) == 4 + len(over)
    assert all(t.constraints["max_params"] <= 0 for t in trials if t not in over)
    for trial in over:
        assert trial.state == TrialState.PRUNED and trial.user_attrs["parameter_count"] > budget
        # the sampler is told: a positive constraint marks the trial infeasible
        assert trial.constraints["max_params"] > 0


# ---------------------------------------------------------------- warm starts

def test_a_warm_start_queues_the_best_configurations_of_another_study(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/o.db"
    source = load_config([*FAKE, *SMALL_CNN, f"storage={storage}", "study_name=old", "baselines=[]"])
    old, _, _ = open_study(source)
    for value in (0.5, 0.9, 0.7, 0.8):  # real sampled configurations, told made-up accuracies
        trial = old.ask()
        suggest(trial, source.space)
        old.tell(trial, value)
    best = sorted(old.trials, key=lambda t: -t.value)[:2]
    new = load_config([*FAKE, *SMALL_CNN, f"storage={storage}", "study_name=new", "warm_start=old",
                       "warm_start_top_k=2", "space.dropout=0.3"])
    study, created, _ = open_study(new)
    assert created
    warm = [t for t in study.get_trials(states=(TrialState.WAITING,)) if "warm_start" in t.user_attrs]
    assert [t.user_attrs["warm_start"] for t in warm] == [f"old#{t.number}" for t in best]
    for queued, original in zip(warm, best, strict=True):
        # dropout is fixed in the new space: dropped; everything else runs as it did
        kept = {k: v for k, v in original.params.items() if k != "dropout"}
        assert queued.system_attrs["fixed_params"] == kept
        assert suggest(optuna.trial.FixedTrial(kept), new.space)["dropout"] == 0.3
    assert "dropped (not in this space): dropout" in capsys.readouterr().out
    missing = load_config([*FAKE, *SMALL_CNN, f"storage={storage}", "study_name=newer",
                           "tracking_uri=none", "warm_start=missing"])
    with pytest.raises(SearchError, match="warm_start=missing: no study of that name"):
        prepare(missing)


# ---------------------------------------------------------------- MLflow

def test_the_experiment_opens_on_training_runs_in_the_mlflow_ui(tmp_path):
    from search.tracking.study_run import ParentRun

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    config = load_config([*FAKE, f"tracking_uri={tracking}", f"storage=sqlite:///{tmp_path}/o.db"])
    client = MlflowClient(tracking)
    client.create_experiment("cnn3")  # made before the tag existed
    ParentRun(config)
    tags = client.get_experiment_by_name("cnn3").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
