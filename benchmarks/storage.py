"""What the storage costs when several processes share a study: SQLite against PostgreSQL.

    python benchmarks/storage.py [processes=1,2,4] [trials=24] [storage_trials=40]
                                 [out=benchmarks/results/storage.json]

Two figures for each storage and number of processes, measured in one run on one machine:

1. **trials per hour**: `processes` copies of the real command (`python -m search.run
   study=cnn3 dataset=fake epochs=1`, a small cnn3, MLflow off) started at once on a new study of
   `trials` trials; finished trials over the wall time from the first start to the last exit
   (start-up included, as a user waits for it).
2. **storage milliseconds per trial**: the same processes' storage work alone, no training:
   each reserves and runs trials of cnn3's whole space (the reservation lock, ask, 18 suggested
   parameters, 3 reported epochs, the user attributes a trial records, tell), `storage_trials`
   in all, split between them; wall time per trial.

PostgreSQL is a throwaway local server (`benchmarks/postgres_server.py`); SQLite is a file in a
temporary folder. Ratios against SQLite with one process are printed; nothing is asserted.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna

from search.config.command_line import command_overrides, main_guard
from search.config.errors import SearchError
from search.config.settings import load_config
from search.config.space import suggest
from search.runner.objective import StopSignal
from search.runner.process import reserve_and_run
from search.storage.studies import open_study
from search.storage.trials import count_finished

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.postgres_server import PostgresServer  # noqa: E402

SMALL = ["space.batch_size.choices=[128]", "space.hidden_1.choices=[16]",
         "space.hidden_2.choices=[0]", *[f"space.width_{i}.choices=[8]" for i in (1, 2, 3)],
         *[f"space.kernel_size_{i}.choices=[3]" for i in (1, 2, 3)]]
ARGS = ["study=cnn3", "dataset=fake", "device=cpu", "epochs=1", "pruner=none", "sampler=random",
        "tracking_uri=none", "checkpoint_every=null", *SMALL]
SETTINGS = {"processes": "1,2,4", "trials": 24, "storage_trials": 40,
            "out": "benchmarks/results/storage.json"}


def trials_per_hour(storage: str, processes: int, trials: int, folder: Path) -> dict[str, Any]:
    env = {"OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    running = [subprocess.Popen([sys.executable, "-m", "search.run", *ARGS, f"n_trials={trials}",
                                 f"storage={storage}"], cwd=folder, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for _ in range(processes)]
    errors = [p.communicate()[1] for p in running]
    wall = time.perf_counter() - started
    failed = [error for p, error in zip(running, errors) if p.returncode]
    if failed:
        raise SearchError(f"a benchmark process failed:\n{failed[0][-2000:]}")
    finished = count_finished(optuna.load_study(study_name="cnn3", storage=storage))
    return {"finished": finished, "wall_seconds": wall, "trials_per_hour": finished / wall * 3600}


def _storage_work(storage: str, trials: int, since: str, results: Any) -> None:
    """One process's storage work: reserved trials that suggest, report and record, no training;
    puts (seconds, trials) of the reserved loop alone (no start-up) on `results`."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    config = load_config([*ARGS, f"n_trials={trials}", f"storage={storage}"])
    study, _, _ = open_study(config)
    ran = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal ran
        ran += 1
        suggest(trial, config.space)
        for epoch in (1, 2, 3):
            trial.report(0.1 * epoch, epoch)
            trial.should_prune()
        for key in ("epochs_run", "train_seconds", "parameter_count", "seconds_per_epoch",
                    "images_per_second", "best_epoch", "best_val_accuracy", "seed"):
            trial.set_user_attr(key, 1.0)
        return 0.3

    started = time.perf_counter()
    reserve_and_run(study, objective, config, stop=StopSignal(), callbacks=[],
                 since=datetime.fromisoformat(since))
    results.put((time.perf_counter() - started, ran))


def storage_ms_per_trial(storage: str, processes: int, trials: int) -> dict[str, Any]:
    open_study(load_config([*ARGS, f"n_trials={trials}", f"storage={storage}"]))  # the schema
    since = datetime.now().isoformat()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_storage_work, args=(storage, trials, since, queue))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    measured = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    finished = count_finished(optuna.load_study(study_name="cnn3", storage=storage))
    # Each process's time per trial it ran (what a trial waits on the storage, lock included).
    per_trial = [seconds / ran * 1000 for seconds, ran in measured if ran]
    return {"finished": finished, "ms_per_trial": sum(per_trial) / len(per_trial)}


def main(argv: list[str]) -> int:
    settings = {**SETTINGS, **command_overrides(argv, "benchmarks/storage.py", SETTINGS)}
    counts = [int(n) for n in str(settings["processes"]).split(",")]
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    server = PostgresServer.start()
    results: dict[str, Any] = {"settings": settings, "runs": []}
    try:
        for kind in ("sqlite", "postgresql"):
            for processes in counts:
                with tempfile.TemporaryDirectory(prefix="search-storage-") as folder:
                    row: dict[str, Any] = {"backend": kind, "processes": processes}
                    for measure, function, trials in (
                            ("throughput", trials_per_hour, settings["trials"]),
                            ("storage", storage_ms_per_trial, settings["storage_trials"])):
                        name = f"{measure}_{processes}_{kind}".replace("-", "_")
                        url = (server.url(server.create_database(name)) if kind == "postgresql"
                               else f"sqlite:///{folder}/{name}.db")
                        args = (url, processes, trials, Path(folder)) if measure == "throughput" \
                            else (url, processes, trials)
                        row[measure] = function(*args)
                    results["runs"].append(row)
                    print(f"{kind:<10} {processes} process(es): "
                          f"{row['throughput']['trials_per_hour']:7,.0f} trials/hour, "
                          f"storage {row['storage']['ms_per_trial']:6.1f} ms per trial", flush=True)
    finally:
        server.stop()
    base = next(r for r in results["runs"] if r["backend"] == "sqlite" and r["processes"] == 1)
    for row in results["runs"]:
        row["throughput_ratio_to_sqlite_1"] = (row["throughput"]["trials_per_hour"]
                                               / base["throughput"]["trials_per_hour"])
        row["storage_ratio_to_sqlite_1"] = (row["storage"]["ms_per_trial"]
                                            / base["storage"]["ms_per_trial"])
        print(f"  {row['backend']:<10} x{row['processes']}: throughput "
              f"{row['throughput_ratio_to_sqlite_1']:.2f}x, storage time per trial "
              f"{row['storage_ratio_to_sqlite_1']:.2f}x of SQLite with one process")
    out = Path(settings["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
