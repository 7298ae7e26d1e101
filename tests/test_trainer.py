"""The trainer on its own: learns on tiny data, stops when asked, detects divergence."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import SMALL_PARAMS

from search.training.loop import (
    TrainingDiverged,
    build_optimizer,
    build_schedule,
    train,
)


def test_learns_and_reports_every_epoch(fake_data):
    train_set, val_set, spec = fake_data.train, fake_data.val, fake_data.spec
    seen = []
    result = train("cnn3", SMALL_PARAMS, train_data=train_set, val_data=val_set, spec=spec, epochs=3,
                   seed=0, device="cpu", on_epoch=lambda m: seen.append(m) and False)
    assert [m.epoch for m in seen] == [1, 2, 3] == [m.epoch for m in result.history]
    assert result.history[-1].val_accuracy > 0.3  # chance is 0.1
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert all(m.images_per_second > 0 and m.epoch_seconds > 0 for m in seen)
    assert result.best_epoch in (1, 2, 3) and result.parameter_count > 0
    assert not result.stopped_early


def test_same_seed_same_result(fake_data):
    train_set, val_set, spec = fake_data.train, fake_data.val, fake_data.spec
    runs = [train("cnn3", SMALL_PARAMS, train_data=train_set, val_data=val_set, spec=spec, epochs=1,
                  seed=5, device="cpu").history[0] for _ in range(2)]
    assert runs[0].train_loss == runs[1].train_loss and runs[0].val_accuracy == runs[1].val_accuracy


def test_on_epoch_true_stops_training(fake_data):
    train_set, val_set, spec = fake_data.train, fake_data.val, fake_data.spec
    result = train("cnn3", SMALL_PARAMS, train_data=train_set, val_data=val_set, spec=spec, epochs=5,
                   seed=0, device="cpu", on_epoch=lambda m: m.epoch == 2)
    assert len(result.history) == 2 and result.stopped_early


def test_divergence_raises(fake_data):
    train_set, val_set, spec = fake_data.train, fake_data.val, fake_data.spec
    params = dict(SMALL_PARAMS, optimizer="sgd", lr=1e6, momentum=0.99, batch_norm=False)
    with pytest.raises(TrainingDiverged, match="training loss became"):
        train("cnn3", params, train_data=train_set, val_data=val_set, spec=spec, epochs=3,
              seed=0, device="cpu")


@pytest.mark.parametrize("params, cls, check", [
    ({"optimizer": "sgd", "momentum": 0.8, "nesterov": True}, torch.optim.SGD,
     lambda g: g["momentum"] == 0.8 and g["nesterov"]),
    ({"optimizer": "adam", "beta1": 0.85, "beta2": 0.995}, torch.optim.Adam,
     lambda g: g["betas"] == (0.85, 0.995)),
    ({"optimizer": "adamw"}, torch.optim.AdamW, lambda g: True),
    ({"optimizer": "rmsprop", "alpha": 0.95, "momentum": 0.5}, torch.optim.RMSprop,
     lambda g: g["alpha"] == 0.95 and g["momentum"] == 0.5),
    ({"optimizer": "adagrad"}, torch.optim.Adagrad, lambda g: True),
])
def test_optimizer_gets_its_own_params(params, cls, check):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer = build_optimizer(model, {"lr": 0.01, "weight_decay": 1e-3, **params})
    assert type(optimizer) is cls and check(optimizer.param_groups[0])
    decays = [g["weight_decay"] for g in optimizer.param_groups]
    assert decays == [1e-3, 0.0]  # weights decay, biases and BN parameters do not


def test_schedules():
    model = torch.nn.Linear(2, 2)
    for name, expected_end in (("none", 1.0), ("cosine", 0.0), ("step", 0.1 ** 2)):
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        schedule = build_schedule(optimizer, {"schedule": name, "gamma": 0.1, "step_size": 2}, 6, 10)
        for _ in range(59):
            optimizer.step()
            schedule.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected_end, abs=0.01), name


@pytest.mark.parametrize("params", [
    {**SMALL_PARAMS, "augment": True, "dropout": 0.3, "schedule": "cosine"},   # random crops, dropout
    {**SMALL_PARAMS, "optimizer": "sgd", "momentum": 0.9, "schedule": "step", "gamma": 0.5,
     "step_size": 1},
])
def test_resuming_from_a_checkpoint_continues_as_if_never_stopped(fake_data, params):
    train_set, val_set, spec = fake_data.train, fake_data.val, fake_data.spec
    kwargs = dict(train_data=train_set, val_data=val_set, spec=spec, epochs=4, seed=3,
                  device="cpu")
    straight = train("cnn3", params, **kwargs).history
    saved = io.BytesIO()

    def after(epoch_state):  # the checkpoint after epoch 2, serialised as a trial saves it
        if epoch_state()["epoch"] == 2:
            torch.save(epoch_state(), saved)

    # A run that dies during its third epoch, after the second epoch's checkpoint ...
    train("cnn3", params, **kwargs, checkpoint=after, on_epoch=lambda m: m.epoch == 3)
    saved.seek(0)
    # ... and a new one that resumes from that checkpoint.
    resumed = train("cnn3", params, **kwargs, resume_from=torch.load(saved, weights_only=False))
    assert [m.epoch for m in resumed.history] == [1, 2, 3, 4]
    for ours, theirs in zip(resumed.history, straight, strict=True):
        assert ours.train_loss == pytest.approx(theirs.train_loss, rel=1e-5)
        assert ours.val_accuracy == theirs.val_accuracy
        assert ours.lr == pytest.approx(theirs.lr)
