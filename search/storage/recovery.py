"""Trials whose process died (kill -9, a lost machine, a full disk): failed, and run again.

Each running trial records its owner: host, pid and the process's start time (so a pid reused by
another process does not count as alive). A process starting on the same host fails at once
every RUNNING trial whose owner is gone; a trial of another host is failed by Optuna's heartbeat
once it is `GRACE_SECONDS` stale (`search.storage.studies.make_storage` wires both to `retry`). Either way
the failed trial is queued again with the same parameters, recording which trial it repeats, so
the study still ends with exactly `n_trials` finished trials and every configuration it meant to
try. Such a FAIL is no fault of the trial: it does not use up a run's budget (`retried`), and a
process that was only stopped (SIGSTOP, a hung machine) and wakes to find its trial failed goes
on with the next one.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from search.storage.trials import INHERITED, TrialAttr


def _start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot, from /proc); None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22 of proc(5), after the name


def this_process() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid)}


def is_alive(owner: dict[str, Any]) -> bool:
    """Whether the process an owner record names still runs (and is the same process)."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    started = _start_time(pid)
    return started is None or owner.get("started") is None or started == owner["started"]


def retry(study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> None:
    """Queues a failed trial again with its parameters (Optuna's heartbeat callback too), once:
    a trial stopped by a signal is queued by its own process before Optuna records its FAIL,
    and a process killed in between leaves it RUNNING for recovery, which must not queue it twice."""
    if trial.number in retried(study.get_trials(deepcopy=False)):
        return
    attrs = {k: trial.user_attrs[k] for k in INHERITED if k in trial.user_attrs}
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={**attrs, TrialAttr.RETRY_OF: trial.number}))


def retried(trials: list[FrozenTrial]) -> set[int]:
    """The numbers of the trials that recovery failed and queued again: their FAIL says nothing
    about their parameters, so it uses up no run's budget."""
    return {t.user_attrs[TrialAttr.RETRY_OF] for t in trials if TrialAttr.RETRY_OF in t.user_attrs}


def recover_dead_trials(study: optuna.Study) -> list[int]:
    """Fails and retries the RUNNING trials of this host whose process is gone, and those of
    any host whose heartbeat is stale. Returns the numbers of the trials this call failed.

    Stale trials are failed here, as Optuna's `fail_stale_trials` would (it runs too, before each
    trial: a backstop), so that they get a fail_reason first: a FAIL trial takes no attributes."""
    storage, host = study._storage, socket.gethostname()  # Optuna has no public accessor
    study_id = storage.get_study_id_from_name(study.study_name)
    stale: set[int] = set()
    with contextlib.suppress(Exception):  # best effort: a storage without heartbeats has none
        stale = set(storage._get_stale_trial_ids(study_id))
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(TrialAttr.OWNER)
        owner = owner if isinstance(owner, dict) else {}
        trial_id = trial._trial_id  # (private too; it saves a query per running trial)
        if trial_id in stale:
            reason = (f"its process (pid {owner.get('pid')} on {owner.get('host')}) sent no "
                      "heartbeat within the grace period: stopped, hung or cut off; failed by "
                      f"pid {os.getpid()} on {host}")
        elif owner.get("host") == host and not is_alive(owner):
            reason = f"its process (pid {owner.get('pid')} on {host}) died while it ran"
        else:
            continue
        try:
            storage.set_trial_user_attr(trial_id, TrialAttr.FAIL_REASON, reason)
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # another process recovered it first
            continue
        retry(study, storage.get_trial(trial_id))
        failed.append(trial.number)
    return failed
