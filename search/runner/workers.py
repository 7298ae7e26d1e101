"""`workers=N`: N trial processes share one study, for small models that leave a GPU mostly idle.

`python -m search.run study=cnn3 workers=4` runs the study in 4 processes against the same
storage: the command's own process opens the study first (creating it, storing its config and
enqueuing the baselines exactly once), then starts N-1 worker processes
(`python -m search.runner.workers ...` with the same overrides) and works alongside them. A small model
cannot keep a GPU busy from one process (kernel launches, Python, storage writes and logging
between epochs all leave it idle); several processes fill those gaps. On a CPU the cores are
split between the processes.

Each process reserves its trials as `search.runner.process` describes, so between them they start
exactly the trials that are missing. Each worker prints one line per trial it ran, prefixed
`[worker i]`, with the study's finished count. Ctrl-C (or `kill`) stops everything: the terminal's
signal reaches only the main process (the workers run in their own process group), which sends
each worker one SIGTERM; each marks its running trial FAIL, as a single process does, and the
storage stays consistent. A worker whose main process has died starts no new trial. Workers never
end the study: the main process does, once they are all done.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime

from search.config.command_line import run_command
from search.config.errors import SearchError
from search.config.settings import StudyConfig, load_config
from search.runner.objective import StopSignal, storage_cause
from search.runner.process import Session
from search.runner.progress import TrialLines, storage_failure
from search.storage.studies import quiet_optuna

WORKER_FLAG = "--worker"
STOP_GRACE_SECONDS = 60  # how long an interrupted worker may take to mark its trial FAIL


def placement(config: StudyConfig, visible: str | None = None) -> list[tuple[dict[str, str], list[str]]]:
    """Per trial process (0 is the main one): the environment and the extra overrides that put
    it on its GPU slot. With `gpus=[0,1] workers_per_gpu=2` the slots are GPUs 0, 1, 0, 1; a
    worker sees only its GPU (CUDA_VISIBLE_DEVICES) and trains on cuda:0, which is that GPU.

    `gpus=` ids are the ones this process sees, as `cuda:N` is: under a `CUDA_VISIBLE_DEVICES`
    the user already set (`visible`, default: this process's environment), id N is the N-th
    entry of that list, so `CUDA_VISIBLE_DEVICES=2,3 gpus=0,1` puts the workers on GPUs 2 and 3.
    """
    if config.gpus is None:
        return [({}, [])] * config.workers
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    listed = [entry.strip() for entry in visible.split(",")] if visible and visible.strip() else None
    if listed is not None and max(config.gpus) >= len(listed):
        raise SearchError(f"gpus={list(config.gpus)}: CUDA_VISIBLE_DEVICES={visible} shows "
                          f"{len(listed)} GPU(s) (ids 0..{len(listed) - 1}).")
    slots = [gpu for _ in range(config.workers_per_gpu) for gpu in config.gpus]
    return [({"CUDA_VISIBLE_DEVICES": listed[gpu] if listed else str(gpu)},
             ["gpus=null", f"workers={config.workers}", "device=cuda:0"]) for gpu in slots]


def replaced(overrides: Sequence[str], extra: Sequence[str]) -> list[str]:
    """The overrides with `extra`'s keys replaced (a key may be given only once)."""
    keys = {word.partition("=")[0] for word in extra}
    return [word for word in overrides if word.partition("=")[0] not in keys] + list(extra)


class Workers:
    """The N-1 worker processes the main process starts, waits for and stops."""

    def __init__(self, config: StudyConfig, overrides: Sequence[str], since: datetime) -> None:
        self.config, self.overrides, self.since = config, list(overrides), since
        self.processes: list[subprocess.Popen] = []

    def start(self) -> None:
        command = [sys.executable, "-m", "search.runner.workers", WORKER_FLAG, str(os.getpid()),
                   self.since.isoformat()]
        for index, (env, extra) in enumerate(placement(self.config)[1:], 1):
            # Own process group: Ctrl-C reaches only the main process, which forwards it once.
            self.processes.append(subprocess.Popen(
                [*command, str(index), *replaced(self.overrides, extra)], process_group=0,
                env={**os.environ, **env}))

    def wait(self, stop: StopSignal) -> None:
        """Until every worker has exited; polled, so that a held Ctrl-C gets through."""
        while any(p.poll() is None for p in self.processes):
            stop.check()
            time.sleep(0.2)

    def failed(self) -> list[tuple[int, int]]:
        """(worker index, exit status) of the workers that did not exit cleanly."""
        return [(i, p.returncode) for i, p in enumerate(self.processes, 1) if p.returncode != 0]

    def stop(self) -> None:
        """One SIGTERM per worker (each marks its trial FAIL), then a kill for laggards.

        SIGTERM, not SIGINT: a command started in the background inherits SIGINT ignored."""
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ----------------------------------------------------------------------------------------------
# A worker process: `python -m search.runner.workers --worker PARENT_PID SINCE INDEX key=value ...`
# ----------------------------------------------------------------------------------------------


def worker_main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] != WORKER_FLAG:
        print("usage: started by `python -m search.run ... workers=N`, not by hand.", file=sys.stderr)
        return 2
    parent_pid, since, index = int(argv[1]), datetime.fromisoformat(argv[2]), int(argv[3])
    # Installed explicitly: a process started in the background inherits SIGINT ignored.
    stop = StopSignal()
    stop.install()
    quiet_optuna()
    config = load_config(argv[4:])
    try:
        session = Session.join(config)
        try:
            session.run_trials(stop, [TrialLines(index, session.config.n_trials)], since=since,
                               parent_pid=parent_pid)
        finally:
            session.close()
    except KeyboardInterrupt:  # stopped by the main process, maybe before its first trial
        return stop.exit_status
    except Exception as error:
        cause = storage_cause(error)
        if cause is None:
            raise
        print(f"[worker {index}] {storage_failure(config, cause)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_command(worker_main)
