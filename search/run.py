"""`python -m search.run study=NAME [key=value ...]`: run (or resume) a hyperparameter search.

Everything a user can get wrong is checked before the storage is touched: the config, the data,
the storage URL, a changed config on resume. Then trials run until the study has `n_trials`
finished (complete + pruned) trials, so rerunning the same command after Ctrl-C runs only the rest.
"""

from __future__ import annotations

import sys
import time
import warnings

import optuna
from optuna.study import MaxTrialsCallback

from search.cli import KEY_HELP, help_text, main_guard
from search.config import StudyConfig, load_config, to_yaml
from search.dry_run import dry_run
from search.objective import Objective, StopSignal, TrialFailed, load_search_data
from search.progress import Progress, describe_trial, format_params
from search.study import FINISHED, check_resume, check_storage, count_finished, make_storage, open_study
from search.trainer import resolve_device

EXAMPLES = [
    "study=cnn3",
    "study=cnn3 dataset=fake epochs=3 n_trials=10 tracking_uri=none",
    "study=resnet20 dataset=fashion_mnist epochs=10 pruner=median",
    "study=cnn3 space.lr.high=0.1 space.optimizer.choices=[sgd,adam] sampler=random",
    "study=cnn3 --cfg",
]
SUMMARY = ("Runs an Optuna study: each trial trains the study's model with sampled "
           "hyperparameters, reports validation accuracy every epoch and is pruned early when it "
           "falls behind. Rerun the same command to resume an interrupted study.")


def make_observers(config: StudyConfig) -> list:
    """Trial observers for the optional integrations (MLflow, dashboard artifacts).

    An unreachable tracking store is a SearchError here, before the study is opened.
    """
    from search.dashboard import DashboardArtifacts
    observers: list = []
    if config.tracking_enabled:
        from search.tracking import MlflowTracker, check_tracking  # mlflow imports take ~2 s
        check_tracking(config.tracking_uri)
        observers.append(MlflowTracker(config))
    return observers + [DashboardArtifacts(config)]


def end_study(observers: list, study: optuna.Study, interrupted: bool) -> None:
    """Lets observers close what spans the whole run (the MLflow parent run, the learning
    curves still being drawn); `search.workers` ends its runs the same way."""
    for observer in observers:
        if hasattr(observer, "study_ended"):
            observer.study_ended(study, interrupted)


def run(config: StudyConfig) -> int:
    device = resolve_device(config.device)
    data = load_search_data(config)
    check_storage(config.storage)
    if config.dry_run:
        for label, params, report in dry_run(config.model, config.space, data.spec, device):
            print(f"dry run: {label} model ok - {report['parameter_count']:,} parameters, "
                  f"loss {report['loss']:.3f}  ({format_params(params, limit=99)})")
        print("dry run: the space works; nothing was written to the storage.")
        return 0
    check_resume(config, make_storage(config.storage))
    for reason in config.skipped_baselines:
        print(f"note: {reason}; that baseline is skipped.")
    observers = make_observers(config)
    study, resumed = open_study(config)
    done = count_finished(study)
    print(f"{'Resuming' if resumed else 'Created'} study '{config.study_name}' in {config.storage}: "
          f"{config.model} on {config.dataset} ({len(data.train)} train / {len(data.val)} val images), "
          f"{config.epochs} epochs max, {done}/{config.n_trials} trials finished, device {device}.",
          flush=True)
    remaining = config.n_trials - done
    if remaining <= 0:
        print("Nothing to do: the study already has its trials (raise n_trials= to run more).")
        return print_summary(study, config)
    stop = StopSignal()  # Ctrl-C and SIGTERM (`kill`, job schedulers) stop cleanly
    stop.install()
    objective = Objective(config, data, device, observers, stop)
    progress = Progress(total=config.n_trials, done=done)
    started = time.perf_counter()
    try:
        # Failed trials count towards this run's budget, so a study whose every trial diverges
        # still ends; a rerun fills the finished-trial count up to n_trials.
        study.optimize(objective, n_trials=remaining, timeout=config.timeout, catch=(TrialFailed,),
                       callbacks=[progress, MaxTrialsCallback(config.n_trials, states=FINISHED),
                                  stop.check])
    except KeyboardInterrupt:
        progress.close()
        end_study(observers, study, interrupted=True)
        print(f"\nInterrupted after {time.perf_counter() - started:.0f} s: the running trial is marked "
              "FAIL and the storage is consistent. Rerun the same command to resume.", file=sys.stderr)
        return 130
    progress.close()
    end_study(observers, study, interrupted=False)
    print(f"Ran for {time.perf_counter() - started:.0f} s.")
    return print_summary(study, config)


def print_summary(study: optuna.Study, config: StudyConfig) -> int:
    """The study's trial counts, its best trial and the commands to look further; exit code 0."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    print("Trials: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n))
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        print("No trial completed yet; rerun to continue the study.")
        return 0
    best = study.best_trial
    print(f"Best: {describe_trial(best)}")
    print(f"  params: {format_params(best.params, limit=99)}")
    args = f"study={config.study} storage={config.storage}"
    if config.study_name != config.study:
        args += f" study_name={config.study_name}"
    print("Next:")
    print(f"  python -m search.dashboard {args}   # optuna-dashboard: trials, curves, importances")
    if config.tracking_enabled and config.tracking_uri.startswith(("http://", "https://")):
        print(f"  open {config.tracking_uri} (MLflow)   # compare runs")
    elif config.tracking_enabled:
        print(f"  mlflow ui --backend-store-uri {config.tracking_uri}   # compare runs")
    print(f"  python -m search.report {args}   # tables, plots, final test accuracy")
    return 0


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text("search.run", SUMMARY, KEY_HELP, EXAMPLES))
        return 0
    show_config = "--cfg" in argv
    unknown = [a for a in argv if a.startswith("-") and a not in ("--cfg",)]
    if unknown:
        print(f"error: unknown option {unknown[0]}; options: --help, --cfg.", file=sys.stderr)
        return 2
    config = load_config([a for a in argv if a != "--cfg"])
    if show_config:
        print(to_yaml(config), end="")
        return 0
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # Heartbeats (see search.study) are flagged experimental; the warning means nothing to users.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if config.workers > 1 and not config.dry_run:
        from search.workers import run_workers  # N trial processes against the same storage
        return run_workers(config, [a for a in argv if a != "--cfg"])
    return run(config)


if __name__ == "__main__":
    sys.exit(main_guard(main))
