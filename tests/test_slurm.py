"""The SLURM recipe (`deploy/slurm/search.sbatch`) run by a real SLURM: a single-node cluster
(`slurm_cluster.SlurmCluster`), a real PostgreSQL server for the Optuna storage and for MLflow,
and the shipped script submitted as it is, with only what a node without GPUs and a small test
need on the sbatch line. One array job of four tasks on one study; while the tasks train, one is
scancelled and another requeued, as a user and a scheduler would. The study still ends with
exactly `n_trials`, both interrupted trials run again from their checkpoints, and no password
shows in anything SLURM or the tasks write.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import FINISHED, ROOT, SMALL_CNN, cli_env
from mlflow import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from slurm_cluster import SlurmCluster, unavailable

from benchmarks.postgres_server import PASSWORD

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")]

SBATCH = ROOT / "deploy" / "slurm" / "search.sbatch"
TASKS, N_TRIALS, EPOCHS = 4, 8, 8
# On the sbatch line: four tasks instead of eight, one CPU each (the node has two: two tasks run
# at once, each bound to its CPU), no GPU; after the script's name, words that replace or add to
# its command's: the CPU, the built-in fake data set, the small cnn3, eight 8-epoch trials (2-5 s
# each), a checkpoint after every epoch.
SUBMIT_OPTIONS = [f"--array=0-{TASKS - 1}", "--gres=none", "--cpus-per-task=1"]
WORDS = ["device=cpu", "dataset=fake", f"epochs={EPOCHS}", f"n_trials={N_TRIALS}",
         "checkpoint_every=0", "pruner=none", "baselines=[]", *SMALL_CNN]


@pytest.fixture(scope="module")
def slurm():
    """A single-node SLURM cluster for this module; skipped only where SLURM cannot be
    installed, or started (it needs root)."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    started = time.monotonic()
    cluster = SlurmCluster.start()
    print(f"\nSLURM cluster up (sinfo: idle) in {time.monotonic() - started:.1f} s")
    yield cluster
    cluster.stop()


def submit_folder(tmp_path: Path) -> Path:
    """Where sbatch is run, as a checkout of the repository looks to the script: its studies/
    and the logs/ folder it ships."""
    submit = tmp_path / "submit"
    (submit / "logs").mkdir(parents=True)
    (submit / "studies").symlink_to(ROOT / "studies")
    return submit


def private_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def array_task(pid: int, job: str) -> int | None:
    """The task of array job `job` that a process runs in (SLURM sets it in its environment)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    variables = dict(v.decode(errors="replace").partition("=")[::2] for v in environ if b"=" in v)
    if variables.get("SLURM_ARRAY_JOB_ID") != job:
        return None
    return int(variables["SLURM_ARRAY_TASK_ID"])


def squeue(slurm: SlurmCluster, job: str) -> dict[int, tuple[str, str]]:
    """{task: (state, reason)} of the job's tasks still in the queue."""
    lines = slurm.run("squeue", "-h", "-r", "-j", job, "-o", "%K %T %r").splitlines()
    return {int(task): (state, reason)
            for task, state, reason in (line.split(maxsplit=2) for line in lines if line.strip())}


def poll(what: str, condition, slurm: SlurmCluster, timeout: float):
    """`condition()` once it is truthy; fails with the cluster's logs at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.2)  # the poll interval
    pytest.fail(f"waited {timeout:.0f} s for {what}\n{slurm.logs()}")


def test_the_recipe_runs_an_array_job_through_a_scancel_and_a_requeue(slurm, postgres, tmp_path):
    # The storage URL, password included, in a private file, as the script expects it; MLflow's
    # URL has none: libpq reads it from a private PGPASSFILE. Both databases are new.
    storage = postgres.url(postgres.create_database("optuna_slurm"))
    mlflow_db = postgres.create_database("mlflow_slurm")
    storage_file = private_file(tmp_path / "search-storage", storage + "\n")
    pgpass = private_file(tmp_path / "pgpass",
                          f"127.0.0.1:{postgres.port}:{mlflow_db}:search:{PASSWORD}\n")
    # The submit directory: the tasks run there (studies/ is read from it) and write their logs
    # and the artifact store they share (mlruns/optuna-artifacts: checkpoints, curves) there.
    submit = submit_folder(tmp_path)
    env = {key: value for key, value in cli_env().items()  # sbatch exports it to the tasks
           if key not in ("SEARCH_STORAGE", "PGPASSWORD") and not key.startswith(("SLURM_", "SBATCH_"))}
    env.update(SEARCH_STORAGE_FILE=str(storage_file), SEARCH_VENV=sys.prefix,
               SEARCH_DATA_DIR=str(tmp_path / "datasets"), PGPASSFILE=str(pgpass),
               MLFLOW_TRACKING_URI=postgres.url(mlflow_db, password=False))

    submitted = time.monotonic()
    job = slurm.run("sbatch", "--parsable", *SUBMIT_OPTIONS, str(SBATCH), *WORDS,
                    cwd=submit, env=env).strip()
    assert job.isdigit(), job
    logs = [submit / "logs" / f"search-cnn3-{job}_{task}.out" for task in range(TASKS)]
    opened: list[optuna.Study] = []  # one connection pool for every poll

    def two_tasks_mid_trial() -> dict[int, FrozenTrial] | None:
        """{task: its trial} once two tasks each train a trial (a first try, not a retry) that
        has saved a checkpoint and has a few epochs to go."""
        assert squeue(slurm, job), "the job ended before two tasks were mid-trial:\n" + "\n".join(
            path.read_text() for path in logs if path.exists())
        if not opened:
            try:  # the tasks create the tables and the study; the test creates nothing
                rdb = optuna.storages.RDBStorage(storage, skip_table_creation=True)
                opened.append(optuna.load_study(study_name="cnn3", storage=rdb))
            except Exception:  # noqa: BLE001 - no tables yet, or no study
                return None
        mid_trial = {}
        for trial in opened[0].get_trials(deepcopy=False):
            epoch = trial.user_attrs.get("checkpoint", {}).get("epoch", 0)
            if (trial.state == TrialState.RUNNING and 1 <= epoch <= EPOCHS - 4
                    and "retry_of" not in trial.user_attrs):
                task = array_task(trial.user_attrs["owner"]["pid"], job)
                if task is not None:
                    mid_trial[task] = trial
        return dict(list(mid_trial.items())[:2]) if len(mid_trial) >= 2 else None

    victims = poll("two tasks mid-trial", two_tasks_mid_trial, slurm, timeout=120)
    (cancelled, cancelled_trial), (requeued, requeued_trial) = victims.items()
    # Each training process is bound to the one CPU its task was given, not the node's two: srun
    # got --cpus-per-task (SLURM 22.05 no longer passes it on), and the two tasks share none.
    bound = [os.sched_getaffinity(trial.user_attrs["owner"]["pid"]) for trial in victims.values()]
    assert [len(cpus) for cpus in bound] == [1, 1] and not bound[0] & bound[1], bound
    slurm.run("scancel", f"{job}_{cancelled}")               # SIGTERM (SIGKILL after KillWait)
    slurm.run("scontrol", "requeue", f"{job}_{requeued}")   # the same, then back to the queue
    # SLURM holds a requeued job for two minutes (its begin time); an administrator lets it go.
    poll("the requeued task to wait for its begin time",
         lambda: squeue(slurm, job).get(requeued) == ("PENDING", "BeginTime"), slurm, timeout=60)
    slurm.run("scontrol", "update", f"JobId={job}_{requeued}", "StartTime=now")
    poll("every task to end", lambda: not squeue(slurm, job), slurm, timeout=180)
    wall = time.monotonic() - submitted

    # ---- SLURM: scontrol (the jobs, still in slurmctld's memory) and sacct (its completion log)
    shown = slurm.run("scontrol", "show", "job", "--details", job)
    raw_ids = {int(task): raw for raw, task in
               re.findall(r"JobId=(\d+) ArrayJobId=\d+ ArrayTaskId=(\d+)", shown)}
    assert sorted(raw_ids) == list(range(TASKS)), shown
    states = {int(task): state for task, state in
              re.findall(r"ArrayTaskId=(\d+).*?JobState=(\w+)", shown, re.S)}
    assert states == {task: "COMPLETED" for task in range(TASKS)} | {cancelled: "CANCELLED"}, shown
    restarts = {int(task): int(n) for task, n in
                re.findall(r"ArrayTaskId=(\d+).*?Restarts=(\d+)", shown, re.S)}
    assert restarts == {task: int(task == requeued) for task in range(TASKS)}, shown
    accounted = slurm.run("sacct", "--completion", "--long", "--parsable2")
    columns, *lines = accounted.splitlines()
    rows = [dict(zip(columns.split("|"), line.split("|"))) for line in lines]
    records: dict[int, list[str]] = {}
    for row in rows:
        task = next(t for t, raw in raw_ids.items() if raw == row["JobID"])
        records.setdefault(task, []).append(row["State"])
    # One record per run of a task: the requeued task's first run is logged as it goes back to
    # the queue (PENDING), its second as it ends. Nothing FAILED.
    assert records == {task: ["COMPLETED"] for task in range(TASKS)} | {
        cancelled: ["CANCELLED"], requeued: ["PENDING", "COMPLETED"]}, accounted

    # ---- the study: exactly n_trials, no configuration twice, both stopped trials run again
    study = optuna.load_study(study_name="cnn3", storage=storage)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == N_TRIALS, [t.state.name for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    configurations = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(configurations)) == N_TRIALS, "a configuration was tried twice"
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t.number for t in failed) == sorted([cancelled_trial.number, requeued_trial.number])
    for stopped in failed:
        assert stopped.user_attrs["fail_reason"].startswith("SIGTERM"), stopped.user_attrs
        [retry] = [t for t in trials if t.user_attrs.get("retry_of") == stopped.number]
        assert retry.state in FINISHED and retry.params == stopped.params
        assert retry.user_attrs["seed"] == stopped.user_attrs["seed"]
        # It went on from the stopped trial's last checkpoint, the earlier epochs reported again.
        resumed = retry.user_attrs["resumed_from_epoch"]
        assert resumed == stopped.user_attrs["checkpoint"]["epoch"] >= 1
        for epoch in range(1, resumed + 1):
            assert retry.intermediate_values[epoch] == stopped.intermediate_values[epoch]
    artifacts = submit / "mlruns" / "optuna-artifacts"
    assert artifacts.is_dir() and not list(artifacts.glob("checkpoint-*"))  # removed once done

    # ---- MLflow: one run per trial, none left RUNNING, the stopped trials' runs FAILED
    client = MlflowClient(postgres.url(mlflow_db))
    runs = client.search_runs([client.get_experiment_by_name("cnn3").experiment_id],
                              max_results=1000)
    children = {int(r.data.tags["trial_number"]): r for r in runs
                if r.data.tags.get("search.role") == "trial"}
    assert len([r for r in runs if r.data.tags.get("search.role") == "study"]) == 1
    assert sorted(children) == [t.number for t in trials]
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    assert {children[t.number].info.status for t in failed} == {"FAILED"}

    # ---- each task's log: the command's own output; a stopped task's also has SLURM's notice
    texts = {task: path.read_text() for task, path in enumerate(logs)}
    for task, text in texts.items():
        assert "Traceback" not in text and "warning" not in text.lower(), text
        # The script's first line says where the task ran; PyTorch's threads follow the binding.
        assert re.match(r"search: job \d+ \(array task \d\) on \S+: CPUs \d, "
                        r"CUDA_VISIBLE_DEVICES=none$", text.splitlines()[0]), text
        threads = re.findall(r"device cpu \((\d+) of (\d+) usable CPUs\)", text)
        assert threads and set(threads) == {("1", "1")}, text
        started = re.findall(r"^(?:Created|Resuming) study 'cnn3'", text, re.M)
        assert len(started) == 1 + (task == requeued), text  # the requeued task ran it twice
        ours = [line for line in text.splitlines()
                if not line.startswith(("slurmstepd", "srun: ", "Interrupted after"))]
        assert not [line for line in ours if "error" in line.lower()], text
        if task in (cancelled, requeued):
            assert "CANCELLED AT" in text and "Interrupted after" in text, text
            assert ("DUE TO JOB REQUEUE" in text) == (task == requeued), text
        else:
            assert "srun" not in text and "slurmstepd" not in text and "Interrupted" not in text
    assert sum(len(re.findall(r"^trial +\d+ complete", text, re.M))
               for text in texts.values()) == N_TRIALS

    # ---- no password in what SLURM shows and keeps (its state, spool and logs) or the tasks wrote
    for name, text in [("scontrol show job", shown), ("sacct", accounted),
                       *((f"the log of task {task}", text) for task, text in texts.items())]:
        assert PASSWORD not in text, name
    kept = subprocess.run(["grep", "-rl", PASSWORD, str(slurm.folder)], capture_output=True, text=True)
    assert kept.returncode == 1 and not kept.stdout, kept.stdout  # 1: no file has it

    print(f"\nthe array job: {wall:.1f} s from sbatch to the last task's end; {N_TRIALS} trials "
          f"in {TASKS} tasks: {N_TRIALS / TASKS / wall * 3600:.0f} trials/hour per task")


def test_the_documented_commands_fit_a_node_declared_as_measured(slurm, tmp_path):
    """The node is declared as `slurmd -C` measures this machine (2 CPUs): the documented commands
    are accepted as they are (`--test-only`: SLURM checks the request and starts nothing), and a
    task larger than the node is refused, as on a real small node."""
    submit = submit_folder(tmp_path)
    assert re.search(rf"\bCPUTot={os.cpu_count()}\b", slurm.run("scontrol", "show", "node"))
    for options in ([], ["--gres=none"]):
        done = subprocess.run(["sbatch", "--test-only", *options, str(SBATCH), "device=cpu"],
                              cwd=submit, env=slurm.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "to start at" in done.stderr, (options, done.stderr)
    too_big = subprocess.run(["sbatch", "--test-only", f"--cpus-per-task={os.cpu_count() + 2}",
                              str(SBATCH)], cwd=submit, env=slurm.env, capture_output=True,
                             text=True, timeout=60)
    assert too_big.returncode != 0 and "node configuration is not available" in too_big.stderr


def sqlite_env(tmp_path: Path, storage: Path) -> dict[str, str]:
    """The tasks' environment for a study in a SQLite file, with MLflow logging off."""
    env = {key: value for key, value in cli_env().items()
           if key != "SEARCH_STORAGE" and not key.startswith(("SLURM_", "SBATCH_"))}
    env.update(SEARCH_STORAGE_FILE=str(private_file(tmp_path / "search-storage",
                                                    f"sqlite:///{storage}\n")),
               SEARCH_VENV=sys.prefix, MLFLOW_TRACKING_URI="none")
    return env


def test_a_task_of_two_cpus_trains_on_both(slurm, tmp_path):
    """With task binding on, the training process gets every CPU its task asked for, and
    PyTorch runs that many threads (srun is given --cpus-per-task: since SLURM 22.05 it does not
    take it from the job, and the step would be bound to one CPU)."""
    submit = submit_folder(tmp_path)
    env = sqlite_env(tmp_path, tmp_path / "optuna.db")
    job = slurm.run("sbatch", "--parsable", "--array=0", "--gres=none", "--cpus-per-task=2",
                    str(SBATCH), "device=cpu", "dataset=fake", "epochs=1", "n_trials=1",
                    "baselines=[]", *SMALL_CNN, cwd=submit, env=env).strip()
    poll("the task to end", lambda: not squeue(slurm, job), slurm, timeout=120)
    text = (submit / "logs" / f"search-cnn3-{job}_0.out").read_text()
    assert re.search(r"^search: job \d+ \(array task 0\) on \S+: CPUs 0[-,]1,", text, re.M), text
    assert "device cpu (2 of 2 usable CPUs)" in text, text
    assert re.search(r"^trial +0 complete", text, re.M), text


def test_gpu_tasks_each_get_their_own_gpu_and_a_clear_refusal_without_cuda(slurm, tmp_path):
    """The recipe as shipped (`--gres=gpu:1`, `device=cuda`) on the node's four fake GPUs: the
    two tasks that run at once are given different GPUs (CUDA_VISIBLE_DEVICES), and with no
    CUDA behind them each stops at once with one clear line, exit status 2, nothing written."""
    submit = submit_folder(tmp_path)
    storage = tmp_path / "optuna.db"
    env = sqlite_env(tmp_path, storage)
    # Held, then released: both tasks are placed in one scheduling pass, so both hold a GPU at once.
    job = slurm.run("sbatch", "--parsable", "--hold", "--array=0-1", "--cpus-per-task=1",
                    str(SBATCH), *WORDS[1:], cwd=submit, env=env).strip()
    slurm.run("scontrol", "release", job)
    poll("both tasks to end", lambda: not squeue(slurm, job), slurm, timeout=120)
    shown = slurm.run("scontrol", "show", "job", job)
    assert re.findall(r"JobState=(\w+)", shown) == ["FAILED", "FAILED"], shown
    assert re.findall(r"ExitCode=(\d+):", shown) == ["2", "2"], shown
    visible = []
    for task in (0, 1):
        text = (submit / "logs" / f"search-cnn3-{job}_{task}.out").read_text()
        header = re.match(r"search: job \d+ \(array task \d\) on \S+: CPUs \d, "
                          r"CUDA_VISIBLE_DEVICES=(\d)$", text.splitlines()[0])
        assert header, text
        visible.append(header[1])
        assert "error: device=cuda: CUDA is not available" in text and "Traceback" not in text, text
    assert len(set(visible)) == 2, visible
    assert not storage.exists()  # refused before anything was written
