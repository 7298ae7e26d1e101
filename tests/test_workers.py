"""`workers=N`: several trial processes share one study and stop at exactly `n_trials`."""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import torch
from helpers import FAKE, TINY, run_cli
from optuna.trial import TrialState

from search.config.errors import SearchError
from search.config.settings import load_config
from search.runner.objective import StopSignal, TrialFailed
from search.runner.process import reserve_and_run
from search.runner.workers import placement, replaced


def _run_threads(tmp_path: Path, n_trials: int, threads: int, objective) -> optuna.Study:
    """`reserve_and_run` in several threads, each with its own Study object (as separate processes
    have)."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    config = load_config([*FAKE, f"storage={storage}", f"n_trials={n_trials}"])
    optuna.create_study(study_name=config.study_name, storage=storage, direction="maximize")
    since = datetime.now()
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            study = optuna.load_study(study_name=config.study_name, storage=storage,
                                      sampler=optuna.samplers.RandomSampler(seed=index))
            reserve_and_run(study, objective, config, stop=StopSignal(), callbacks=[], since=since)
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)

    running = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join(timeout=60)
    assert not errors, errors
    return optuna.load_study(study_name=config.study_name, storage=storage)


def test_concurrent_workers_start_exactly_the_missing_trials(tmp_path: Path) -> None:
    n_trials = 9
    together = threading.Condition()
    started, running, most = [0], [0], [0]

    def objective(trial: optuna.Trial) -> float:
        # Each trial waits until another runs beside it (or none is left to start), so the
        # workers really overlap, and the test says that they did.
        with together:
            started[0] += 1
            running[0] += 1
            most[0] = max(most[0], running[0])
            together.notify_all()
            together.wait_for(lambda: running[0] >= 2 or started[0] >= n_trials, timeout=30)
        try:
            return trial.suggest_float("x", 0, 1)
        finally:
            with together:
                running[0] -= 1
                together.notify_all()

    study = _run_threads(tmp_path, n_trials=n_trials, threads=3, objective=objective)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.COMPLETE] * n_trials  # none over, none running, none failed
    assert most[0] >= 2, "the workers never ran trials at the same time"


def test_failures_use_up_the_budget_instead_of_looping(tmp_path: Path) -> None:
    def objective(trial: optuna.Trial) -> float:
        raise TrialFailed("diverged")

    study = _run_threads(tmp_path, n_trials=4, threads=2, objective=objective)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.FAIL] * 4


def test_gpu_slots_give_each_process_its_own_gpu():
    config = load_config(["study=cnn3", "gpus=0,1", "workers_per_gpu=2", "n_trials=8"])
    assert config.workers == 4
    plan = placement(config)
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in plan] == ["0", "1", "0", "1"]
    # A worker's config (the main command's words and its own) trains on the one GPU it sees.
    worker = load_config(replaced(["study=cnn3", "gpus=0,1", "workers_per_gpu=2", "n_trials=8"],
                                  plan[1][1]))
    assert (worker.gpus, worker.device, worker.workers) == (None, "cuda:0", 4)
    assert placement(load_config(["study=cnn3", "workers=3", "n_trials=8"])) == [({}, [])] * 3
    with pytest.raises(SearchError, match="len\\(gpus\\) x workers_per_gpu = 4"):
        load_config(["study=cnn3", "gpus=[0,1]", "workers_per_gpu=2", "workers=3"])
    with pytest.raises(SearchError, match="distinct GPU ids"):
        load_config(["study=cnn3", "gpus=0,0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_gpus_without_cuda_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    result = run_cli("search.run", *TINY, "gpus=0,1", "n_trials=4",
                     f"storage=sqlite:///{tmp_path}/o.db", cwd=tmp_path)
    assert result.returncode == 2 and "gpus=0,1: CUDA is not available" in result.stderr
    assert not (tmp_path / "o.db").exists()
