"""Shared helpers of the tests (imported by them; conftest.py holds the fixtures): the override
lists the tests run with, the real CLI in a subprocess on tiny data, a study read back or waited
on, a real `mlflow` server, a saved model and `search.predict` called as the command is."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import FrozenTrial, TrialState
from threadpoolctl import threadpool_limits

from mlflow import MlflowClient

from search.config.command_line import main_guard
from search.config.datasets import DATASETS
from search.training.classifier import Classifier, classifier_from_state
from search.training.models import build_model
from search.training.results import ModelCard

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# ---------------------------------------------------------------- override lists, from named parts

# The cnn3 study on `dataset=fake`: CIFAR-shaped images generated in memory, nothing to download.
FAKE = ["study=cnn3", "dataset=fake"]
# Successive halving that halves at every rung: a few trials give both complete and pruned ones.
AGGRESSIVE_PRUNER = ["pruner=successive_halving", "pruner.reduction_factor=2"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what n_trials counts


def space_choices(choices: dict[str, list[int]]) -> list[str]:
    """One `space.NAME.choices=[...]` override per searched parameter."""
    return [f"space.{name}.choices={values}" for name, values in choices.items()]


# A cnn3 of 8 channels and 3x3 kernels: a trial of a few epochs on `dataset=fake` takes about a
# second on a CPU.
SMALL_CNN_CHOICES = {"batch_size": [128], "hidden_1": [16], "hidden_2": [0],
                     **{f"width_{i}": [8] for i in (1, 2, 3)},
                     **{f"kernel_size_{i}": [3] for i in (1, 2, 3)}}
SMALL_CNN = space_choices(SMALL_CNN_CHOICES)
# The small cnn3 on fake data on the CPU: what most end-to-end commands start from.
SMALL = [*FAKE, "device=cpu", *SMALL_CNN]
# A slightly wider cnn3 with two first-layer kernel sizes to sample, on the CPU and without MLflow:
# a 3-epoch trial on `dataset=fake` still takes well under a second.
TINY = [*FAKE, "device=cpu", "tracking_uri=none", *space_choices(
    {**SMALL_CNN_CHOICES, "width_3": [16], "hidden_1": [32], "kernel_size_1": [3, 5]})]
# A trial's parameters for the trainer on its own (no Optuna): a cnn3 that learns the fake data set
# in a few one-second epochs.
SMALL_PARAMS = {"width_1": 8, "width_2": 8, "width_3": 16, "hidden_1": 32, "hidden_2": 0,
                "batch_size": 64, "optimizer": "adam", "lr": 3e-3}


def overriding(base: list[str], *extra: str) -> list[str]:
    """`base` with `extra`'s keys replaced: a command refuses a key given twice."""
    keys = {word.partition("=")[0] for word in extra}
    return [word for word in base if word.partition("=")[0] not in keys] + list(extra)


def cli_env() -> dict[str, str]:
    # One thread: on a small shared machine, OpenMP threads spinning against other processes
    # make a tiny model several times slower, not faster.
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_cli(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env or cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 200) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run_cli(module: str, *args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return finish(start_cli(module, *args, cwd=cwd), timeout=timeout)


def load(storage: str, name: str = "cnn3") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


@contextmanager
def one_thread() -> Iterator[None]:
    """In-process equivalent of OMP_NUM_THREADS=1 (torch and scikit-learn), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trained_an_epoch(trials: list[FrozenTrial]) -> bool:
    """A RUNNING trial has reported at least one epoch."""
    return any(t.state == TrialState.RUNNING and t.intermediate_values for t in trials)


def wait_for_running_trial(storage: str, study_name: str, process: subprocess.Popen,
                           predicate: Callable[[list[FrozenTrial]], bool],
                           timeout: float = 120) -> list[FrozenTrial]:
    """Polls the study that `process` runs until one of its trials is RUNNING and
    `predicate(trials)` holds, and returns those trials. Fails with the process's output should
    it exit first, and kills it should the deadline pass first."""
    deadline = time.monotonic() + timeout
    trials: list[FrozenTrial] = []
    error: Exception | None = None
    while time.monotonic() < deadline:
        try:  # the study may not exist yet, or its storage be mid-creation
            trials = load(storage, study_name).get_trials(deepcopy=False)
        except Exception as caught:
            error = caught
        else:
            if any(t.state == TrialState.RUNNING for t in trials) and predicate(trials):
                return trials
        try:
            process.wait(timeout=0.05)  # the poll interval, cut short should the process end
        except subprocess.TimeoutExpired:
            continue
        out, err = process.communicate(timeout=60)
        pytest.fail(f"the process exited with {process.returncode} before a trial of "
                    f"{study_name!r} was RUNNING as awaited:\n{out}\n{err}")
    process.kill()
    pytest.fail(f"no trial of {study_name!r} was RUNNING as awaited within {timeout:.0f} s; "
                f"states: {[t.state.name for t in trials]}, last error: {error!r}")


# ---------------------------------------------------------------- a real mlflow server

def wait_for_health(url: str, process: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    """Returns once GET /health answers (about 15 s on an idle machine, more on a busy one)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"mlflow server did not answer /health within {seconds:.0f} s:\n{log.read_text()}")


class MlflowServer:
    """`mlflow server` on a SQLite file and a free loopback port; can be stopped and started
    again on the same port and store (an outage)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.folder / "server.log"
        # Job execution (a second process) is not needed to log runs; off, the server starts faster.
        env = dict(cli_env(), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(log, "a") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                 f"sqlite:///{self.folder / 'mlflow.db'}", "--default-artifact-root",
                 str(self.folder / "art"), "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1"],
                stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_for_health(self.url, self.process, log)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()




# ---------------------------------------------------------------- what a study must be after any fault


def check_study(storage: str, n_trials: int, tracking: str | None = None,
                name: str = "cnn3") -> optuna.Study:
    """The invariants every fault and every crowd must leave behind."""
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == n_trials, [t.state.name for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    configurations = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(configurations)) == len(configurations), "a configuration was tried twice"
    retried = [t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs]
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    assert set(retried) <= set(failed)  # only failed trials are retried, each once
    assert len(retried) == len(set(retried))
    if tracking is not None:
        client = MlflowClient(tracking)
        experiment = client.get_experiment_by_name(name)
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        parents = [r for r in runs if r.data.tags.get("search.role") == "study"]
        children = [r for r in runs if r.data.tags.get("search.role") == "trial"]
        assert len(parents) == 1, [r.info.run_name for r in parents]
        assert sorted(int(r.data.tags["trial_number"]) for r in children) == [t.number for t in trials]
        assert not [r for r in runs if r.info.status == "RUNNING"]
    return study


# ---------------------------------------------------------------- final models and search.predict


def make_model(dataset: str = "fake") -> Classifier:
    """An untrained cnn3 with a card: what the files hold matters here, not its accuracy."""
    spec = DATASETS[dataset]
    card = ModelCard("cnn3", SMALL_PARAMS, spec.name, spec.channels, spec.image_size, spec.mean,
                     spec.std, spec.classes, "cnn3", 7, "rank 1", 11, 2, 1024, 0.5, 0.25, 2.0)
    torch.manual_seed(0)
    network = build_model("cnn3", SMALL_PARAMS, in_channels=spec.channels,
                          image_size=spec.image_size, num_classes=spec.num_classes)
    return classifier_from_state(card, network.state_dict())


def predict(capsys, *words: str) -> tuple[int, list[str], str]:
    """`python -m search.predict WORDS` in this process: its exit status, stdout lines, stderr."""
    from search.predict import main as predict_main

    code = main_guard(predict_main, list(words))
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err
