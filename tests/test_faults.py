"""Faults of the machine, made real: read-only folders, a full disk, a folder that is a file.

CI runs as root, and root ignores permission bits, so a folder cannot be made unwritable with
chmod. These tests make the fault with what root cannot bypass either: a read-only bind mount or
a tiny tmpfs, each inside a private mount namespace (`unshare`), so the mount exists only for
the command under test and disappears with it. Each command is the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import SMALL, cli_env, overriding, run_cli

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent  # where the scenario below finds conftest
ARGS = [*SMALL, "epochs=1", "pruner=none"]


def _unshare() -> list[str] | None:
    """A private mount namespace: as a mapped root in a user namespace where allowed, else
    (as root) a plain one."""
    if not shutil.which("unshare"):
        return None
    for prefix in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


UNSHARE = _unshare()
needs_namespace = pytest.mark.skipif(UNSHARE is None, reason="cannot make a mount namespace here")


def in_namespace(script: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs a bash script in its own mount namespace; its exit status is the script's."""
    return subprocess.run([*UNSHARE, "bash", "-euc", script], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def command(*words: str) -> str:
    return " ".join([sys.executable, "-m", *words])


def clean_refusal(result: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@needs_namespace
def test_a_read_only_storage_folder_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "ro").mkdir()
    result = in_namespace(
        "mount --bind -o ro ro ro\n"  # read-only for everyone, root included
        f"exec {command('search.run', *ARGS, 'n_trials=1', 'storage=sqlite:///ro/optuna.db', 'tracking_uri=none')}",
        tmp_path)
    clean_refusal(result, "storage=sqlite:///ro/optuna.db: cannot write", "Read-only file system")
    assert not list((tmp_path / "ro").iterdir())


@needs_namespace
def test_an_existing_storage_on_a_read_only_mount_is_refused_and_unchanged(tmp_path):
    storage = "sqlite:///db/optuna.db"
    (tmp_path / "db").mkdir()
    first = run_cli("search.run", *ARGS, "n_trials=1", f"storage={storage}", "tracking_uri=none",
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "db" / "optuna.db").read_bytes()
    result = in_namespace(
        "mount --bind -o ro db db\n"
        f"exec {command('search.run', *ARGS, 'n_trials=2', f'storage={storage}', 'tracking_uri=none')}",
        tmp_path)
    clean_refusal(result, "cannot write", "Read-only file system")
    assert (tmp_path / "db" / "optuna.db").read_bytes() == before


@needs_namespace
def test_an_unwritable_mlruns_stops_the_run_before_the_study_is_created(tmp_path):
    (tmp_path / "mlruns").mkdir()
    result = in_namespace(  # the default tracking store, sqlite:///mlruns/mlflow.db, cannot be written
        "mount --bind -o ro mlruns mlruns\n"
        f"exec {command('search.run', *ARGS, 'n_trials=1', 'storage=sqlite:///optuna.db')}",
        tmp_path)
    clean_refusal(result, "tracking_uri=sqlite:///mlruns/mlflow.db: cannot write",
                  "tracking_uri=none")
    assert not (tmp_path / "optuna.db").exists()  # no Optuna storage was created first


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory) -> Path:
    """A folder holding `db/optuna.db` with two finished trials."""
    folder = tmp_path_factory.mktemp("faults")
    (folder / "db").mkdir()
    result = run_cli("search.run", *ARGS, "n_trials=2", "storage=sqlite:///db/optuna.db",
                     "tracking_uri=none", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder


@needs_namespace
def test_the_report_reads_a_database_on_a_read_only_mount(finished_study):
    result = in_namespace(
        "mount --bind -o ro db db\n"
        f"exec {command('search.report', 'study=cnn3', 'storage=sqlite:///db/optuna.db', 'out=ro-report')}",
        finished_study)
    assert result.returncode == 0, result.stderr
    assert (finished_study / "ro-report" / "cnn3" / "report.md").is_file()


@needs_namespace
def test_a_report_folder_that_cannot_be_written_is_refused_before_any_work(finished_study):
    (finished_study / "locked").mkdir(exist_ok=True)
    result = in_namespace(
        "mount --bind -o ro locked locked\n"
        f"exec {command('search.report', 'study=cnn3', 'storage=sqlite:///db/optuna.db', 'out=locked', 'retrain=top1')}",
        finished_study)
    clean_refusal(result, "out=locked: cannot write", "Read-only file system")


def test_a_report_folder_that_is_a_file_is_refused(finished_study):
    (finished_study / "taken").write_text("not a folder")
    result = run_cli("search.report", "study=cnn3", "storage=sqlite:///db/optuna.db", "out=taken",
                     cwd=finished_study)
    clean_refusal(result, "out=taken: cannot create the folder")


# The scenario runs inside the namespace, where the tiny disk exists: start a study, fill the disk
# while a trial trains, then free it and run the same command again. It prints what it saw.
DISK_FULL = textwrap.dedent("""
    import json, os, subprocess, sys
    import optuna
    sys.path.insert(0, TESTS)
    from helpers import trained_an_epoch, wait_for_running_trial
    os.makedirs("disk")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", "disk"], check=True)
    storage = "sqlite:///disk/optuna.db"
    command = [sys.executable, "-m", "search.run", *ARGS, f"storage={storage}"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_running_trial(storage, "cnn3", first, trained_an_epoch)  # and it trains on
    with open("disk/fill", "wb") as fill:  # the disk is full from here on
        try:
            while True:
                fill.write(bytes(1 << 16))
                fill.flush()
        except OSError as error:
            full = error.strerror
    out, err = first.communicate(timeout=180)
    os.remove("disk/fill")
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    trials = optuna.load_study(study_name="cnn3", storage=storage).trials
    print(json.dumps({"full": full, "code": first.returncode, "stderr": err,
                      "again_code": again.returncode, "again_stderr": again.stderr,
                      "states": [t.state.name for t in trials],
                      "retry_of": [t.user_attrs.get("retry_of") for t in trials],
                      "reasons": [t.user_attrs.get("fail_reason") for t in trials]}))
""")


@needs_namespace
def test_a_disk_that_fills_up_during_a_trial_stops_cleanly_and_the_rerun_completes(tmp_path):
    args = [*overriding(ARGS, "epochs=12"), "n_trials=2", "tracking_uri=none"]
    (tmp_path / "scenario.py").write_text(f"ARGS = {args!r}\nTESTS = {str(TESTS)!r}\n" + DISK_FULL)
    result = in_namespace(f"exec {sys.executable} scenario.py", tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["full"] == "No space left on device"
    assert seen["code"] == 1, seen["stderr"]
    assert "Traceback" not in seen["stderr"] and "failed while the study ran" in seen["stderr"]
    assert seen["again_code"] == 0, seen["again_stderr"]
    states = seen["states"]
    assert states.count("COMPLETE") == 2 and "RUNNING" not in states
    # The trial the full disk interrupted was failed on the rerun and run again.
    failed = [i for i, state in enumerate(states) if state == "FAIL"]
    assert failed and all("died" in seen["reasons"][i] for i in failed)
    assert sorted(r for r in seen["retry_of"] if r is not None) == failed
