"""Tests for `python -m search.train`: a real trial (the study's own objective, on fake data) is
trained again and gives the same validation accuracy, epoch by epoch; `full=true` tests it."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import torch
from helpers import FAKE, SMALL_CNN, one_thread
from optuna.trial import TrialState

from search.config.command_line import main_guard
from search.config.settings import load_config
from search.runner.final_models import retrain_trial
from search.runner.objective import Objective
from search.storage.reading import open_source, retrain_command
from search.storage.studies import open_study
from search.train import main as train_main
from search.training.classifier import load_classifier, score
from search.training.images import SearchData, load_split

ARGS = [*FAKE, *SMALL_CNN, "epochs=2", "tracking_uri=none", "baselines=[]"]


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory, fake_data: SearchData) -> str:
    """A study with one trial run by the search's own objective."""
    url = f"sqlite:///{tmp_path_factory.mktemp('train') / 'optuna.db'}"
    config = load_config([f"storage={url}", *ARGS])
    study, _, _ = open_study(config)
    with one_thread():
        study.optimize(Objective(config, fake_data, torch.device("cpu")), n_trials=1)
    assert study.trials[0].state == TrialState.COMPLETE
    return url


def test_retraining_a_trial_reproduces_its_validation_accuracy(storage: str) -> None:
    source = open_source({"study": "cnn3", "storage": storage})
    trial = source.study.trials[0]
    lines: list[str] = []
    with one_thread():
        outcome = retrain_trial(source, 0, seeds=1, log=lines.append)
    assert outcome.accuracies == (trial.value,)
    assert [m.val_accuracy for m in outcome.histories[0]] == [
        trial.intermediate_values[epoch] for epoch in sorted(trial.intermediate_values)]
    assert any("(search: " in line for line in lines)


def test_full_true_trains_on_train_and_val_and_reports_test_accuracy(storage: str, capsys,
                                                                     tmp_path: Path) -> None:
    with one_thread():
        code = main_guard(train_main, ["study=cnn3", f"storage={storage}", "trial=0", "full=true",
                                       "seeds=2", f"out={tmp_path}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "train + validation" in out
    match = re.search(r"test accuracy: (\d\.\d{4}) ± (\d\.\d{4}) .*per seed: (\S+), (\S+)$", out, re.M)
    assert match, out
    mean, std, first, second = map(float, match.groups())
    assert 0 <= mean <= 1 and std >= 0 and mean == pytest.approx((first + second) / 2, abs=1e-4)
    # Each model is kept, and scores what was printed for its seed.
    test = load_split("fake", "data", train=False)
    for seed, printed in ((1, first), (2, second)):
        model = load_classifier(tmp_path / f"cnn3/models/trial-0000-seed-{seed}.pt")
        assert model.card.trial_number == 0 and model.card.train_images == 1024
        assert round(score(model, test)[1], 4) == printed == round(model.card.test_accuracy, 4)


def test_report_command_names_this_trial(storage: str) -> None:
    source = open_source({"study": "cnn3", "storage": storage})
    assert retrain_command(source.config, 0) == f"python -m search.train study=cnn3 storage={storage} trial=0"


@pytest.mark.parametrize("words, message", [
    (["trial=99"], "has trials 0.."),
    ([], "no trial given"),
    (["trial=0", "full=maybe"], "expected true or false"),
    (["trial=0", "epochs=3"], "unknown key 'epochs'"),
])
def test_bad_input_is_a_clean_error(storage: str, words: list[str], message: str, capsys) -> None:
    assert main_guard(train_main, ["study=cnn3", f"storage={storage}", *words]) == 2
    assert message in capsys.readouterr().err


def test_help_lists_the_keys(capsys) -> None:
    assert main_guard(train_main, ["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: python -m search.train" in out and "full" in out and "seeds" in out


def test_a_pruned_or_failed_trial_without_params_is_refused(storage: str, capsys) -> None:
    study = optuna.load_study(study_name="cnn3", storage=storage)
    study.tell(study.ask(), state=TrialState.FAIL)
    number = study.trials[-1].number
    assert main_guard(train_main, ["study=cnn3", f"storage={storage}", f"trial={number}"]) == 2
    assert "no parameters recorded" in capsys.readouterr().err
