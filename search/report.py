"""`python -m search.report study=NAME[,NAME...] [key=value ...]`: write a study's report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from search.analysis.compare import write_comparison
from search.analysis.compose import (
    ReportOptions,
    check_reportable,
    final_entries,
    write_report,
)
from search.config.command_keys import LOCATION_KEYS
from search.config.command_keys import REPORT as KEYS
from search.config.command_line import command_overrides, help_text, run_command
from search.config.errors import SearchError
from search.config.keys import checked, with_defaults
from search.config.urls import writable_folder
from search.runner.final_models import TrainedModels, train_final_models
from search.storage.reading import open_source
from search.storage.studies import quiet_optuna
from search.training.loop import resolve_device

SUMMARY = ("Reads a study from its storage (finished, running or interrupted) and writes "
           "reports/<study_name>/: report.md, a self-contained report.html, trials.csv and the "
           "figures as PNG, opening with what to do next (ranges, choices, curves, samples) and "
           "next-study.yaml, the next study written with its reasons. retrain=topN also "
           "retrains the N best configurations and the baseline "
           "on train + validation and evaluates them once on the test set. Several studies "
           "(study=cnn3,resnet20) are also compared side by side.")
EXAMPLES = [
    "study=cnn3",
    "study=cnn3 storage=sqlite:///mlruns/optuna.db top_k=10",
    "study=cnn3 retrain=top3 seeds=3 device=cuda",
    "study=cnn3,resnet20 retrain=top1",
]


def parse_options(overrides: dict[str, Any]) -> ReportOptions:
    """The report's own keys (checked overrides, `KEYS`), defaults filled in."""
    values = with_defaults(KEYS, overrides)
    return ReportOptions(top_k=values["top_k"], retrain=values["retrain"], seeds=values["seeds"],
                         out=Path(str(values["out"])))


def split_studies(overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """`study=a,b [study_name=x,y]` -> one set of location overrides per study."""
    if not overrides.get("study"):
        raise SearchError("no study given: add study=NAME (several: study=cnn3,resnet20).")
    studies = [s.strip() for s in str(overrides["study"]).split(",") if s.strip()]
    names = ([s.strip() for s in str(overrides["study_name"]).split(",")]
             if overrides.get("study_name") else [None] * len(studies))
    if len(names) != len(studies):
        raise SearchError(f"study_name={overrides['study_name']}: give one name per study "
                          f"({len(studies)}: {', '.join(studies)}).")
    shared = {k: v for k, v in overrides.items() if k in LOCATION_KEYS and k not in ("study", "study_name")}
    return [{"study": study, **shared, **({"study_name": name} if name else {})}
            for study, name in zip(studies, names)]


def registered_line(final: TrainedModels) -> str | None:
    """The line that says where the rank-1 configuration's first-seed model was registered
    (chosen by validation rank, as the report's reference model, never by test accuracy)."""
    if final.registered is None:
        return None
    name, version = final.registered
    best = final.evaluation.results[0]
    return (f"Registered models:/{name}/{version} in the MLflow Model Registry (trial "
            f"{best.trial_number}, test accuracy {best.test_accuracies[0]:.4f}); load it with "
            f"search.load_model(\"models:/{name}/{version}\").")


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text("search.report", SUMMARY, KEYS, EXAMPLES, options=()))
        return 0
    overrides = checked(KEYS, command_overrides(argv, "search.report", KEYS))
    options = parse_options(overrides)
    if "device" in overrides:  # placed on this machine up front, before any study is read
        resolve_device(overrides["device"])
    quiet_optuna()
    # Open every study and the output folder first, so a typo in the second name, a study with
    # nothing to report or a folder that cannot be written fails before any work (retraining
    # takes hours) is done, and before anything is created.
    sources = [open_source(locations) for locations in split_studies(overrides)]
    for source in sources:
        check_reportable(source)
    writable_folder(options.out)
    reports = []
    for source in sources:
        entries = final_entries(source.study, options.retrain)
        final = None
        if entries:  # no MLflow run or models/ folder for nothing
            config = source.config
            print(f"final evaluation: {len(entries)} configurations x {options.seeds} seeds x "
                  f"{config.epochs} epochs on {config.dataset}")
            final = train_final_models(source, entries, seeds=options.seeds, out=options.out,
                                       command="search.report", with_predictions=True)
        report = write_report(source, options, evaluation=final.evaluation if final else None)
        reports.append(report)
        print(f"Report of study '{source.study.study_name}': {report.markdown} and {report.html} "
              f"({len(report.figures)} figures, trials.csv)")
        if report.next_study is not None:
            print(f"Next study, with the report's reasons: python -m search.run "
                  f"study={report.next_study}")
        if final is not None:
            print(f"Final models: {final.folder}/")
            registered = registered_line(final)
            if registered:
                print(registered)
    if len(reports) > 1:
        print(f"Comparison: {write_comparison(reports, options.out)}")
    return 0


if __name__ == "__main__":
    run_command(main)
