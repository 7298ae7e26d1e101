"""`python -m search.sync study=NAME [storage=...] [study_name=...] [tracking_uri=...]`: make a
study's MLflow runs complete again, from the Optuna storage.

The storage is the source of truth; MLflow is derived from it. After an outage of the tracking
server (or a worker killed mid-trial), some trials have no run, or a run that stopped short. This
creates the missing runs and completes the short ones (per-epoch metrics, final metrics, tags,
status), without duplicating anything that exists, so it can be run any number of times. Every
`search.run` does the same when its study ends.
"""

from __future__ import annotations

from optuna.trial import TrialState

from search.config.command_keys import SYNC as KEYS
from search.config.command_line import command_overrides, help_text, run_command
from search.config.errors import SearchError
from search.config.keys import checked
from search.storage.reading import open_source
from search.storage.studies import quiet_optuna
from search.storage.trials import counts_toward_n_trials

SUMMARY = ("Creates every missing MLflow run of a study and completes the runs that stopped "
           "short, from the Optuna storage; running it again changes nothing.")
EXAMPLES = ["study=cnn3", "study=cnn3 storage=postgresql://search@db/optuna "
            "tracking_uri=http://mlflow:5000"]


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text("search.sync", SUMMARY, KEYS, EXAMPLES, options=()))
        return 0
    source = open_source(checked(KEYS, command_overrides(argv, "search.sync", KEYS)))
    config = source.config
    if not config.tracking_enabled:
        raise SearchError("tracking_uri=none: there is no MLflow store to sync to; give "
                          "tracking_uri=URL.")
    quiet_optuna()
    from search.tracking.stores import check_tracking  # mlflow imports take ~2 s
    from search.tracking.study_run import ParentRun
    from search.tracking.trial_runs import backfill

    check_tracking(config.tracking_uri, config.study_name)
    study_run, study = ParentRun(config), source.study
    created, completed = backfill(study_run, study)
    trials = study.get_trials(deepcopy=False)
    if not any(t.state == TrialState.RUNNING for t in trials):  # no process works on it now
        done = sum(map(counts_toward_n_trials, trials)) >= config.n_trials  # as search.run counts them
        study_run.close_parent(study, "FINISHED" if done else "KILLED")
    finished = sum(t.state.is_finished() for t in trials)
    print(f"MLflow: study '{config.study_name}' in {config.tracking_uri}: {created} "
          f"run(s) created, {completed} completed; all {finished} ended trials have their run.")
    return 0


if __name__ == "__main__":
    run_command(main)
