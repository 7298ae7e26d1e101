"""`python -m search.run study=NAME [key=value ...]`: run (or resume) a hyperparameter search.

Everything a user can get wrong is checked before the storage is touched: the config, the data,
the storage URL, the tracking store, a changed config on resume. Then trials run until the study
has `n_trials` finished (complete + pruned) trials, so rerunning the same command after Ctrl-C
runs only the rest. `workers=N` runs N-1 more processes alongside (`search.runner.workers`).
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING

from search.config.command_line import STUDY_KEYS, help_text, run_command
from search.config.params import format_params
from search.config.settings import StudyConfig, load_config, to_yaml
from search.storage.studies import quiet_optuna

if TYPE_CHECKING:
    from search.runner.process import Session

EXAMPLES = [
    "study=cnn3",
    "study=cnn3 dataset=fake epochs=3 n_trials=10 tracking_uri=none",
    "study=resnet20 dataset=fashion_mnist epochs=10 pruner=median",
    "study=cnn3 space.lr.ranges.optimizer.sgd=[0.01,0.1] space.optimizer.choices=[sgd,adam] sampler=random",
    "study=cnn3 --cfg",
]
SUMMARY = ("Runs an Optuna study: each trial trains the study's model with sampled "
           "hyperparameters, reports validation accuracy every epoch and is pruned early when it "
           "falls behind. Rerun the same command to resume an interrupted study.")


def run(config: StudyConfig, overrides: list[str] = ()) -> int:
    """The whole run: checks, the study, the trials (in this and `workers - 1` more processes),
    the summary. `overrides` are the command's words, handed to the worker processes."""
    # Imported here, not above: --help, --cfg and a bad override answer without PyTorch (~3 s).
    from search.runner.objective import storage_cause
    from search.runner.preflight import prepare
    from search.runner.process import Session
    from search.runner.progress import storage_failure
    from search.training.dry_run import dry_run

    device, data = prepare(config)
    if config.dry_run:
        for label, params, report in dry_run(config.model, config.space, data.spec, device):
            print(f"dry run: {label} model ok - {report['parameter_count']:,} parameters, "
                  f"loss {report['loss']:.3f}, {report['precision']}  "
                  f"({format_params(params, limit=99)})")
        print("dry run: the space works; nothing was written to the storage.")
        return 0
    try:
        return _search(Session.open(config, device, data), overrides)
    except Exception as error:  # disk full, database server gone: a fault of the machine
        cause = storage_cause(error)
        if cause is None:
            raise
        print(f"\n{storage_failure(config, cause)}", file=sys.stderr)
        return 1


def _search(session: Session, overrides: list[str]) -> int:
    from search.runner.objective import StopSignal
    from search.runner.progress import Progress, TrialLines, print_summary
    from search.runner.workers import Workers
    from search.storage.trials import count_finished

    config = session.config
    print(session.describe(), flush=True)
    if count_finished(session.study) >= config.n_trials:
        session.close()
        print("Nothing to do: the study already has its trials (raise n_trials= to run more).")
        return print_summary(session.study, config, session.experiment_id)
    stop = StopSignal()  # Ctrl-C and SIGTERM (`kill`, job schedulers) stop cleanly
    stop.install()
    since = datetime.now()
    lines = (Progress(total=config.n_trials, done=count_finished(session.study))
             if config.workers == 1 else TrialLines(0, config.n_trials))
    workers = Workers(config, overrides, since)
    try:
        workers.start()
        session.run_trials(stop, [lines], since=since)
        workers.wait(stop)
    except KeyboardInterrupt:
        lines.close()
        workers.stop()
        session.end(interrupted=True)
        print(f"\nInterrupted after {time.perf_counter() - session.started:.0f} s: the running "
              "trials are marked FAIL and the storage is consistent. Rerun the same command to "
              "resume.", file=sys.stderr)
        return stop.exit_status
    except BaseException:  # a storage failure, a bug: the workers stop too, the curves are saved
        lines.close()
        workers.stop()
        session.close()
        raise
    lines.close()
    session.end(interrupted=False)
    print(f"Ran for {time.perf_counter() - session.started:.0f} s"
          + (f" with {config.workers} worker processes." if config.workers > 1 else "."))
    failed = workers.failed()
    for number, code in failed:
        print(f"warning: worker {number} exited with status {code}.", file=sys.stderr)
    finish = print_summary(session.study, config, session.experiment_id)
    return 1 if failed else finish


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text("search.run", SUMMARY, STUDY_KEYS, EXAMPLES, with_params=True))
        return 0
    show_config = "--cfg" in argv
    unknown = [a for a in argv if a.startswith("-") and a not in ("--cfg",)]
    if unknown:
        print(f"error: unknown option {unknown[0]}; options: --help, --cfg.", file=sys.stderr)
        return 2
    overrides = [a for a in argv if a != "--cfg"]
    config = load_config(overrides)
    if show_config:
        print(to_yaml(config), end="")
        return 0
    quiet_optuna()
    return run(config, overrides)


if __name__ == "__main__":
    run_command(main)
