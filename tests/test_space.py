"""The space as data: sampling with FixedTrial and real trials, conditionals present or absent."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

import search
from search.config.errors import SearchError
from search.config.settings import load_config
from search.config.space import (
    LEFT_OUT,
    check_baseline,
    parse_param,
    parse_space,
    searched_params,
    suggest,
    walk,
)

SPACE = parse_space({
    "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "momentum": {"type": "float", "low": 0.5, "high": 0.99, "when": {"optimizer": "sgd"}},
    "nesterov": {"type": "categorical", "choices": [True, False], "when": {"optimizer": ["sgd"]}},
    "beta1": {"type": "float", "low": 0.8, "high": 0.95, "when": {"optimizer": "adam"}},
    "batch_size": {"type": "int", "low": 32, "high": 256, "step": 32},
    "batch_norm": True,
}, model="cnn3")


def test_conditional_params_appear_only_for_their_parent_value():
    sgd = suggest(optuna.trial.FixedTrial({"optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
                                           "nesterov": True, "batch_size": 64}), SPACE)
    assert sgd == {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True,
                   "batch_size": 64, "batch_norm": True}
    adam = suggest(optuna.trial.FixedTrial({"optimizer": "adam", "lr": 0.001, "beta1": 0.9,
                                            "batch_size": 32}), SPACE)
    assert "momentum" not in adam and "nesterov" not in adam and adam["beta1"] == 0.9


def test_sampled_values_respect_bounds_step_and_log():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(40):
        trial = study.ask()
        params = suggest(trial, SPACE)
        assert 1e-4 <= params["lr"] <= 1e-1
        assert params["batch_size"] % 32 == 0 and 32 <= params["batch_size"] <= 256
        assert ("momentum" in params) == (params["optimizer"] == "sgd")
        assert "batch_norm" not in trial.params  # fixed values are not Optuna params
        study.tell(trial, 0.0)
    assert study.trials[0].distributions["lr"].log


def test_the_walk_asks_only_active_searched_entries_and_records_no_left_out_value():
    def walked(answers):
        asked = []

        def choose(spec, params):
            asked.append(spec.name)
            return answers.get(spec.name, LEFT_OUT)
        return walk(SPACE, choose), asked

    assert walked({"optimizer": "adam", "lr": 0.01}) == (
        {"optimizer": "adam", "lr": 0.01, "batch_norm": True},
        ["optimizer", "lr", "beta1", "batch_size"])  # never SGD's entries, nor the fixed one
    # A parent left for the sampler activates none of its conditionals yet.
    assert walked({}) == ({"batch_norm": True}, ["optimizer", "lr", "batch_size"])


def test_the_space_is_walked_in_one_place():
    """Sampling, baselines, warm starts and the dry run all go through `walk`."""
    package = Path(search.__file__).parent
    walkers = [path.relative_to(package).as_posix() for path in sorted(package.rglob("*.py"))
               if ".is_active(" in path.read_text()]
    assert walkers == ["config/space.py"]


def test_fixed_trial_missing_a_param_fails_loudly():
    with pytest.raises(ValueError):
        suggest(optuna.trial.FixedTrial({"optimizer": "sgd"}), SPACE)


@pytest.mark.parametrize("entry, message", [
    ({"type": "float", "low": 2, "high": 1}, "empty range"),
    ({"type": "float", "low": 0, "high": 1, "log": True}, "low > 0"),
    ({"type": "int", "low": 1.5, "high": 4}, "whole numbers"),
    ({"type": "int", "low": 1, "high": 4, "step": 0}, "positive"),
    ({"type": "categorical", "choices": []}, "non-empty"),
    ({"type": "categorical", "choices": [1, 1]}, "duplicates"),
    ({"type": "uniform", "low": 0, "high": 1}, "'type' must be one of float, int, categorical"),
    ({"type": "float", "low": "a", "high": 1}, "must be a number"),
    ({"type": "float", "low": 0.1, "high": 1, "log": "yes"}, "true or false"),
    ([1, 2], "a list is not a value"),
    ({"type": "float", "low": 0, "high": 1, "when": {"missing": 1}}, "refers to 'missing'"),
])
def test_bad_entries(entry, message):
    with pytest.raises(SearchError, match=message):
        parse_param("x", entry, earlier=["optimizer"])


def test_baseline_checks():
    good = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9}
    assert check_baseline(0, good, SPACE) is None
    assert "inactive" in check_baseline(0, {"optimizer": "adam", "momentum": 0.9}, SPACE)
    assert "outside" in check_baseline(0, {"lr": 5.0}, SPACE)
    assert "not in the space" in check_baseline(0, {"depth": 3}, SPACE)
    assert "fixed" in check_baseline(0, {"batch_norm": False}, SPACE)
    assert searched_params({"lr": 0.01, "batch_norm": True}, SPACE) == {"lr": 0.01}


def test_shipped_baselines_are_complete_configurations():
    """Every parameter a baseline's branch activates is set, so trial 0 is exactly the baseline."""
    for name in ("cnn3", "resnet20", "cnn3-fashion"):
        config = load_config([f"study={name}"])
        baseline = config.baselines[0]

        def from_baseline(spec, params, name=name, baseline=baseline):
            assert spec.name in baseline, (name, spec.name)
            return baseline[spec.name]
        walk(config.space, from_baseline)
