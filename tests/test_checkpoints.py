"""Checkpoints of running trials (`search.storage.checkpoints`): a retry resumes from its
original's checkpoint, and a checkpoint file that carries code is never run (it is read with
`torch.load(weights_only=True)` only), the retry then trains from the start."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest

import optuna
import torch
from helpers import TINY, overriding
from optuna.trial import TrialState

from search.config.settings import load_config
from search.config.space import suggest
from search.runner.objective import Objective, TrialFailed
from search.storage.backends import artifact_store
from search.storage.checkpoints import Checkpoints
from search.storage.recovery import retry
from search.storage.studies import open_study
from search.storage.trials import TrialAttr
from search.training.images import ImageSet, SearchData
from search.training.loop import train
from search.training.results import trial_seed

EPOCHS = 3


@pytest.fixture
def small_data(fake_data) -> SearchData:
    """A quarter of the fake training set: a 3-epoch trial in well under a second."""
    train_set = fake_data.train
    return dataclasses.replace(fake_data, train=ImageSet(train_set.images[:256], train_set.labels[:256]))


class WritesAFile:
    """A pickled callable: unpickling it opens (creates) `path`, as a hostile file's
    `os.system(...)` would run a command."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def _dead_trial(storage: str, data: SearchData, write_checkpoint) -> tuple[optuna.Study, Objective]:
    """Trial 0 trains, saves its checkpoint after epoch 1 (`write_checkpoint` may replace the
    file) and dies; its retry is queued, as recovery queues a dead trial's."""
    config = load_config(overriding([f"storage={storage}", f"epochs={EPOCHS}", "pruner=none",
                                     "checkpoint_every=0", "baselines=[]", *TINY]))
    study, _, _ = open_study(config)
    checkpoints = Checkpoints(artifact_store(config.storage), every=0)
    trial = study.ask()
    params = suggest(trial, config.space)
    seed = trial_seed(config.seed, trial.number)
    trial.set_user_attr(TrialAttr.SEED, seed)
    train(config.model, params, train_data=data.train, val_data=data.val, spec=data.spec, epochs=EPOCHS, seed=seed, device="cpu",
          checkpoint=checkpoints.saver(trial), on_epoch=lambda m: m.epoch == 2)  # dies in epoch 2
    write_checkpoint(checkpoints.store, trial.user_attrs[TrialAttr.CHECKPOINT]["id"])
    study.tell(trial, state=TrialState.FAIL)
    retry(study, study.trials[0])
    return study, Objective(config, data, torch.device("cpu"), checkpoints=checkpoints)


def test_a_retry_resumes_from_its_originals_checkpoint(storage, small_data):
    study, objective = _dead_trial(storage, small_data, lambda store, artifact_id: None)
    study.optimize(objective, n_trials=1, catch=(TrialFailed,))
    retried = study.trials[1]
    assert retried.state == TrialState.COMPLETE and retried.user_attrs["retry_of"] == 0
    assert retried.user_attrs["resumed_from_epoch"] == 1
    assert retried.user_attrs["epochs_run"] == EPOCHS  # epoch 1 reported again, 2 and 3 trained


def test_a_checkpoint_carrying_code_is_not_run_and_the_retry_trains_from_the_start(
        storage, small_data, tmp_path):
    """Someone who can write to the artifact store replaces the checkpoint with a pickle whose
    loading calls a function. Loading it with weights_only=False (as before) ran that function;
    now it is refused, never retried without weights_only, and the trial starts over."""
    marker = tmp_path / "code-ran"

    def hostile(store, artifact_id: str) -> None:
        buffer = io.BytesIO()
        torch.save({"epoch": 1, "model": WritesAFile(marker), "history": []}, buffer)
        buffer.seek(0)
        store.write(artifact_id, buffer)

    study, objective = _dead_trial(storage, small_data, hostile)
    assert objective.checkpoints.resume_state(study.ask()) is None  # the retry, trial 1
    study.tell(1, state=TrialState.FAIL)
    retry(study, study.trials[0])  # queue it afresh, for the objective to run
    study.optimize(objective, n_trials=1, catch=(TrialFailed,))
    assert not marker.exists()
    retried = study.trials[-1]
    assert retried.state == TrialState.COMPLETE, retried.user_attrs.get("fail_reason")
    assert "resumed_from_epoch" not in retried.user_attrs
    assert [m["epoch"] for m in retried.user_attrs["epochs"]] == [1, 2, 3]


def test_the_trainers_checkpoint_loads_with_weights_only(small_data):
    """What the trainer hands a checkpoint holds tensors and plain data only (a fp16 loss
    scale, the generators' states, the history as dicts), so weights_only=True reads all of it."""
    saved = []
    train("cnn3", {"width_1": 8, "width_2": 8, "width_3": 8, "hidden_1": 16, "hidden_2": 0,
                   "optimizer": "sgd", "momentum": 0.9, "schedule": "step", "gamma": 0.5},
          train_data=small_data.train, val_data=small_data.val, spec=small_data.spec, epochs=2,
          seed=0, device="cpu", checkpoint=lambda state: saved.append(state()))
    buffer = io.BytesIO()
    torch.save(saved[0], buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["epoch"] == 1 and loaded["history"][0]["epoch"] == 1
