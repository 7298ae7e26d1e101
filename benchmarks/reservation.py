"""How far one study scales: the capacity of its reservation lock, measured on PostgreSQL.

    python benchmarks/reservation.py [processes=16] [trials=2000] [epochs=3] [tracking=true]
                                     [sampler=tpe] [bucket=500] [grow_to=10000]
                                     [out=benchmarks/results/reservation.json]

Every trial start passes through the study's reservation lock (`search.runner.process.
reserve_and_run`: the room check and the sampler's `ask` run under it). `processes` processes
run the real search code against one study on a throwaway PostgreSQL server — the reservation,
ask, suggestions, per-epoch reports, the trial's attributes, tell, and (`tracking=true`) the
MLflow run of every trial in a PostgreSQL tracking store — with training replaced by an objective
that returns at once (`epochs` synthetic epochs, reported and logged as real ones are). So every
figure is the search's own overhead per trial, the thing that limits how many GPUs one study
can keep busy.

Printed per slice of `bucket` trials as the study grows (the sampler reads every earlier trial,
so its `ask` slows as the study grows):
  - trial starts per second, all processes together;
  - lock wait per start (median and 95th percentile) and lock hold per start (the serial part:
    1 / hold is the most starts per second any number of processes can reach);
  - storage milliseconds per trial (a process's wall time per trial, all its storage and
    tracking work, lock wait included);
and the PostgreSQL connections the processes held at the peak. Then, in one process, the study
is filled with copies of its finished trials (their parameters, attributes and epochs; values
drawn at random) up to 1,000, 2,000, 5,000 and `grow_to` trials, and the serial part of a start
(the lock, the room check and `ask`) is timed at each size, with nothing else running: how the
capacity falls as a study grows. Nothing is asserted.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import optuna
import sqlalchemy
import torch

from search.config.command_line import command_overrides, main_guard
from search.config.settings import load_config
from search.runner import objective as objective_module
from search.runner import process as process_module
from search.runner.objective import Objective, StopSignal
from search.runner.process import make_observers, reserve_and_run
from search.storage.backends import DatabaseLock
from search.storage.studies import open_study
from search.storage.trials import count_finished
from search.training.images import load_search_data
from search.training.results import EpochMetrics, TrainResult

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.postgres_server import PostgresServer  # noqa: E402

SETTINGS = {"processes": 16, "trials": 2000, "epochs": 3, "tracking": True, "sampler": "tpe",
            "bucket": 500, "grow_to": 10000, "out": "benchmarks/results/reservation.json"}


class TimedLock(DatabaseLock):
    """The study's lock, timed: when it was asked for, got, and let go (per process)."""

    events: list[dict[str, float]] = []

    def __init__(self, *args: Any) -> None:  # DatabaseLock takes the lock as it is made
        asked = time.perf_counter()
        super().__init__(*args)
        self.events.append({"asked": asked, "got": time.perf_counter()})

    def release(self) -> None:
        if self.events and "released" not in self.events[-1]:
            self.events[-1]["released"] = time.perf_counter()
        super().release()


def instant_train(model_name: str, params: Any, *, epochs: int, on_epoch: Any, **_: Any) -> TrainResult:
    """Training that takes no time: `epochs` epochs reported (and logged) as a real run's are."""
    history = []
    for epoch in range(1, epochs + 1):
        metrics = EpochMetrics(epoch, 1.0 / epoch, 0.3 * epoch / epochs, 1.0 / epoch,
                               0.3 * epoch / epochs, 1e-3, 0.001, 1e6)
        history.append(metrics)
        if on_epoch(metrics):
            return TrainResult(None, history, 1000, stopped_early=True)
    return TrainResult(None, history, 1000)


def _worker(words: list[str], since: str, out: str) -> None:
    """One process of the study: the real reservation loop, objective and observers."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    config = load_config(words)
    study, _, seed = open_study(config)
    data = load_search_data("fake", "data", val_size=None, seed=0)
    _, observers = make_observers(config, write_note=False)
    trials: list[dict[str, float]] = []

    class Timed(Objective):
        def __call__(self, trial: optuna.Trial) -> float:
            started = time.perf_counter()
            try:
                return super().__call__(trial)
            finally:
                trials.append({"number": trial.number, "started": started,
                               "ended": time.perf_counter()})

    objective = Timed(config, data, torch.device("cpu"), observers)
    with mock.patch.object(objective_module, "train", instant_train), \
            mock.patch.object(process_module, "DatabaseLock", TimedLock):
        reserve_and_run(study, objective, config, stop=StopSignal(), callbacks=[],
                        since=datetime.fromisoformat(since), sampler_seed=seed)
    for observer in observers:
        observer.close()
    # perf_counter is the system's monotonic clock: the processes' times compare directly.
    Path(out).write_text(json.dumps({"locks": TimedLock.events, "trials": trials}))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarise(records: list[dict[str, Any]], bucket: int) -> list[dict[str, Any]]:
    """Per slice of `bucket` trial numbers: starts per second, lock wait/hold, ms per trial."""
    trials = sorted((t for r in records for t in r["trials"]), key=lambda t: t["number"])
    locks = sorted((e for r in records for e in r["locks"] if "released" in e),
                   key=lambda e: e["got"])
    rows = []
    for first in range(0, len(trials), bucket):
        part = trials[first:first + bucket]
        begin, end = part[0]["started"], part[-1]["started"]
        held = [e for e in locks if begin <= e["got"] <= end]
        rows.append({
            "trials": f"{part[0]['number']}-{part[-1]['number']}",
            "starts_per_second": (len(part) - 1) / (end - begin) if end > begin else float("nan"),
            "lock_wait_ms_median": statistics.median([(e["got"] - e["asked"]) * 1000 for e in held]) if held else float("nan"),
            "lock_wait_ms_p95": _percentile([(e["got"] - e["asked"]) * 1000 for e in held], 0.95),
            "lock_hold_ms_median": statistics.median([(e["released"] - e["got"]) * 1000 for e in held]) if held else float("nan"),
            "ms_per_trial": statistics.mean([(t["ended"] - t["started"]) * 1000 for t in part]),
        })
    return rows


def hold_as_the_study_grows(words: list[str], sizes: list[int], repeats: int = 5) -> list[dict[str, Any]]:
    """The serial part of a trial start (lock, room check, ask) in one process, as the study is
    filled up to each size with copies of its finished trials."""
    config = load_config([w for w in words if not w.startswith("n_trials=")]
                         + [f"n_trials={max(sizes) + repeats + 1}"])
    study, _, _ = open_study(config)
    finished = [t for t in study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE]
    random = np.random.default_rng(0)
    since = datetime.now()
    rows = []
    for size in sizes:
        have = len(study.get_trials(deepcopy=False))
        for index in range(max(0, size - have)):
            source = finished[index % len(finished)]
            study.add_trial(optuna.trial.create_trial(
                params=source.params, distributions=source.distributions,
                value=float(random.uniform(0, 1)), user_attrs=source.user_attrs,
                intermediate_values=source.intermediate_values))
        holds = []
        for _ in range(repeats):
            started = time.perf_counter()
            with DatabaseLock(config.storage, f"trials:{config.study_name}"):
                process_module._room_for_one_more(study, config.n_trials, since)
                trial = study.ask()
            holds.append((time.perf_counter() - started) * 1000)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        rows.append({"trials": len(study.get_trials(deepcopy=False)),
                     "hold_ms_median": statistics.median(holds)})
        print(f"  a study of {rows[-1]['trials']:>6,} trials: lock + room check + ask "
              f"{rows[-1]['hold_ms_median']:7.1f} ms (median of {repeats})", flush=True)
    return rows


def peak_connections(url: str, running: list[multiprocessing.Process]) -> int:
    """The most connections to the server seen while the processes run (sampled every 0.5 s)."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    peak = 0
    while any(p.is_alive() for p in running):
        with engine.connect() as connection:
            peak = max(peak, connection.execute(sqlalchemy.text(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")).scalar() - 1)
        time.sleep(0.5)  # the sampling interval of a gauge, not a wait for a condition
    engine.dispose()
    return peak


def main(argv: list[str]) -> int:
    settings = {**SETTINGS, **command_overrides(argv, "benchmarks/reservation.py", SETTINGS)}
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    server = PostgresServer.start()
    try:
        storage = server.url(server.create_database("optuna_reservation"))
        tracking = server.url(server.create_database("mlflow_reservation")) \
            if settings["tracking"] else "none"
        words = ["study=cnn3", "dataset=fake", "device=cpu", f"epochs={settings['epochs']}",
                 f"n_trials={settings['trials']}", f"storage={storage}",
                 f"tracking_uri={tracking}", f"sampler={settings['sampler']}", "pruner=none",
                 "checkpoint_every=null", "baselines=[]"]
        config = load_config(words)
        with tempfile.TemporaryDirectory(prefix="search-reservation-") as folder:
            open_study(config)  # the tables and the study, once, as the first process would
            make_observers(config, write_note=False)  # MLflow's tables and the study's run
            since = datetime.now().isoformat()
            # Spawned, not forked: a fork would share this process's database connections.
            context = multiprocessing.get_context("spawn")
            outs = [f"{folder}/{index}.json" for index in range(settings["processes"])]
            running = [context.Process(target=_worker, args=(words, since, out))
                       for out in outs]
            started = time.perf_counter()
            for process in running:
                process.start()
            peak = peak_connections(server.url(), running)
            for process in running:
                process.join()
            wall = time.perf_counter() - started
            records = [json.loads(Path(out).read_text()) for out in outs if Path(out).exists()]
        finished = count_finished(optuna.load_study(study_name=config.study_name, storage=storage))
        rows = summarise(records, settings["bucket"])
        print(f"{settings['processes']} processes, {finished} trials in {wall:.0f} s "
              f"(MLflow {'on' if settings['tracking'] else 'off'}, sampler {settings['sampler']}); "
              f"peak PostgreSQL connections: {peak} ({peak / settings['processes']:.1f} per "
              "process)")
        print(f"{'trials':>11} {'starts/s':>9} {'wait ms':>8} {'p95':>7} {'hold ms':>8} {'ms/trial':>9}")
        for row in rows:
            print(f"{row['trials']:>11} {row['starts_per_second']:9.1f} "
                  f"{row['lock_wait_ms_median']:8.1f} {row['lock_wait_ms_p95']:7.1f} "
                  f"{row['lock_hold_ms_median']:8.1f} {row['ms_per_trial']:9.1f}", flush=True)
        sizes = sorted({n for n in (1000, 2000, 5000, settings["grow_to"])
                        if finished < n <= settings["grow_to"]})
        growth = hold_as_the_study_grows(words, sizes) if sizes else []
    finally:
        server.stop()
    out = Path(settings["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "finished": finished, "wall_seconds": wall,
                               "peak_connections": peak, "slices": rows, "growth": growth},
                              indent=1))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
