"""The trainer on its own: learns on tiny data, stops when asked, detects divergence."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import SMALL_PARAMS

from search.training.loop import (
    TrainingDiverged,
    build_optimizer,
    build_schedule,
    cuda_rng_state,
    restore_cuda_rng,
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
    resumed = train("cnn3", params, **kwargs, resume_from=torch.load(saved, weights_only=True))
    assert [m.epoch for m in resumed.history] == [1, 2, 3, 4]
    for ours, theirs in zip(resumed.history, straight, strict=True):
        assert ours.train_loss == pytest.approx(theirs.train_loss, rel=1e-5)
        assert ours.val_accuracy == theirs.val_accuracy
        assert ours.lr == pytest.approx(theirs.lr)


class FakeCudaGenerators:
    """CUDA's per-device generator states as PyTorch's `torch.cuda` functions see them, on a
    machine whose process sees `count` GPUs: `set_rng_state` on a device index the process does
    not have raises IndexError, as the real one does."""

    def __init__(self, monkeypatch, count: int) -> None:
        self.count, self.states = count, {i: torch.tensor([i], dtype=torch.uint8) for i in range(count)}
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)

    @staticmethod
    def _index(device) -> int:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        return device.index or 0

    def get(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set(self, state, device="cuda"):
        index = self._index(device)
        if index >= self.count:
            raise IndexError(f"no CUDA device {index}")
        self.states[index] = state.clone()


def test_a_checkpoint_carries_its_own_gpus_random_state_across_gpu_layouts(monkeypatch):
    """The main process (4 GPUs visible) trains a trial on cuda:2 and saves a checkpoint; a
    worker that sees one GPU (cuda:0, CUDA_VISIBLE_DEVICES) resumes it, and the other way
    round. Only the trial's own device's state is saved, and it goes back onto the device the
    resuming trial trains on: with get_rng_state_all() the worker raised IndexError (the trial
    failed for good) and the main process put a worker's state onto GPU 0."""
    main = FakeCudaGenerators(monkeypatch, count=4)
    saved = cuda_rng_state(torch.device("cuda:2"))
    assert torch.equal(saved, torch.tensor([2], dtype=torch.uint8))  # one state: cuda:2's
    worker = FakeCudaGenerators(monkeypatch, count=1)
    restore_cuda_rng(saved, torch.device("cuda:0"))
    assert torch.equal(worker.states[0], saved)
    main = FakeCudaGenerators(monkeypatch, count=4)
    restore_cuda_rng(worker.get("cuda:0"), torch.device("cuda:3"))
    assert [int(main.states[i]) for i in range(4)] == [0, 1, 2, 2]  # cuda:3 only
    assert cuda_rng_state(torch.device("cpu")) is None
    restore_cuda_rng([saved] * 4, torch.device("cuda:0"))  # an older per-GPU list: left alone


def test_the_trainers_checkpoint_holds_one_cuda_state_of_the_trials_device(monkeypatch, fake_data):
    """The trainer's own state function, run on the CPU with the CUDA calls faked: what it saves
    under `cuda_rng` is `cuda_rng_state(device)`, never a list of every GPU's states."""
    import search.training.loop as loop

    monkeypatch.setattr(loop, "cuda_rng_state", lambda device: ("own state of", str(device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state"))
    saved = []
    train("cnn3", SMALL_PARAMS, train_data=fake_data.train, val_data=None, spec=fake_data.spec,
          epochs=2, seed=0, device="cpu", checkpoint=lambda state: saved.append(state()))
    assert saved[0]["cuda_rng"] == ("own state of", "cpu")
