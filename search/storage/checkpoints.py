"""Checkpoints of running trials, so that a trial whose process dies resumes where it was.

A checkpoint is the trainer's whole state after an epoch (model, optimizer, schedule, random
generators, history), written through Optuna's artifact store (the filesystem store beside the
storage, which optuna-dashboard also reads) and named in the trial's user attribute
`checkpoint`. The retry of a dead trial (`search.storage.recovery`) starts from the checkpoint of the
trial it repeats. A trial's checkpoints are removed once it ends, and its retry's once that ends.
At most one is written per `every` seconds, so that a small model's sub-second epochs do not pay
for writing one each. A checkpoint is read with `torch.load(weights_only=True)` only: a file that
holds anything but tensors and plain data (a pickled callable, say) is not run, and the trial
trains from the start.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable
from typing import Any

import optuna
import torch

from search.storage.trials import TrialAttr


class Checkpoints:
    """Saves, finds and removes trial checkpoints in one artifact store."""

    def __init__(self, store: Any, every: float) -> None:
        self.store, self.every = store, every

    def saver(self, trial: optuna.Trial) -> Callable[[Callable[[], dict[str, Any]]], None]:
        """The trainer's `checkpoint` callback for one trial."""
        last = time.monotonic()

        def save(state: Callable[[], dict[str, Any]]) -> None:
            nonlocal last
            if time.monotonic() - last < self.every:
                return
            snapshot = state()
            buffer = io.BytesIO()
            torch.save(snapshot, buffer)
            buffer.seek(0)
            artifact_id = f"checkpoint-{uuid.uuid4().hex}"
            self.store.write(artifact_id, buffer)
            previous = trial.user_attrs.get(TrialAttr.CHECKPOINT)
            trial.set_user_attr(TrialAttr.CHECKPOINT, {"id": artifact_id, "epoch": snapshot["epoch"]})
            self._remove(previous)  # only after the new one is named: never without one
            last = time.monotonic()

        return save

    def resume_state(self, trial: optuna.Trial) -> dict[str, Any] | None:
        """The last checkpoint of the trial this one retries, if it has a readable one."""
        original = self._original(trial)
        meta = original.user_attrs.get(TrialAttr.CHECKPOINT) if original else None
        if not isinstance(meta, dict):
            return None
        try:
            with self.store.open_reader(meta["id"]) as reader:
                # weights_only=True, and never a retry without it: the artifact store is a
                # folder (or bucket) others can write to, and a pickle may carry code. The
                # trainer's state is tensors, plain containers, numbers and strings only.
                state = torch.load(io.BytesIO(reader.read()), map_location="cpu",
                                   weights_only=True)
        except Exception:  # noqa: BLE001 - gone, on another machine, or not ours: from the start
            return None
        return state if isinstance(state, dict) and isinstance(state.get("epoch"), int) else None

    def discard(self, trial: optuna.Trial) -> None:
        """Removes the checkpoints of an ended trial and of the trial it retried."""
        self._remove(trial.user_attrs.get(TrialAttr.CHECKPOINT))
        original = self._original(trial)
        if original is not None:
            self._remove(original.user_attrs.get(TrialAttr.CHECKPOINT))

    @staticmethod
    def _original(trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
        number = trial.user_attrs.get(TrialAttr.RETRY_OF)
        if number is None:
            return None
        return next((t for t in trial.study.get_trials(deepcopy=False) if t.number == number), None)

    def _remove(self, meta: Any) -> None:
        if isinstance(meta, dict):
            try:
                self.store.remove(meta["id"])
            except Exception:  # noqa: BLE001 - already removed (by another process), or gone
                pass
