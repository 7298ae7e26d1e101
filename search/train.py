"""`python -m search.train study=cnn3 trial=42 [storage=...] [seeds=1] [full=true]`: train one
trial's configuration again, with the same trainer and the same parameters.

By default it trains on the study's training split with the trial's own seed and reports
validation accuracy per epoch next to what the search recorded, so a result can be checked
(seed 1 is the trial's own seed: single-threaded on a CPU it reproduces the trial exactly, while
parallel kernels may differ by a few images). `seeds=N` adds N-1 further seeds, to see how much
of a result is luck. `full=true` trains on train + validation and evaluates once on the test set,
as the report's final evaluation does, and keeps each model: saved under
`<out>/<study_name>/models/` and, with MLflow tracking on, logged on its own final run.
"""

from __future__ import annotations

from pathlib import Path

from search.config.command_keys import LOCATION_KEYS
from search.config.command_keys import TRAIN as KEYS
from search.config.command_line import command_overrides, help_text, run_command
from search.config.errors import SearchError
from search.config.keys import checked, with_defaults
from search.runner.final_models import retrain_trial
from search.storage.reading import open_source
from search.storage.studies import quiet_optuna
from search.training.loop import resolve_device
from search.training.classifier import model_file
from search.training.results import mean_and_std

SUMMARY = ("Trains one trial's configuration again with the trainer the search used: on the "
           "training split with the trial's seed, reporting validation accuracy next to what the "
           "search recorded, or with full=true on train + validation, evaluated once on the test set.")
EXAMPLES = ["study=cnn3 trial=42", "study=cnn3 trial=42 seeds=3",
            "study=cnn3 trial=42 full=true seeds=3 device=cuda"]


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text("search.train", SUMMARY, KEYS, EXAMPLES, options=()))
        return 0
    overrides = command_overrides(argv, "search.train", KEYS)
    if "trial" not in overrides:
        raise SearchError("no trial given: add trial=NUMBER (the report's top table lists them).")
    overrides = checked(KEYS, overrides)
    values = with_defaults(KEYS, overrides)
    number, seeds, full = values["trial"], values["seeds"], values["full"]
    if "device" in overrides:  # placed on this machine up front, before any study is read
        resolve_device(overrides["device"])
    quiet_optuna()
    source = open_source({k: v for k, v in overrides.items() if k in LOCATION_KEYS})
    # A trial that is not there is refused before any folder or MLflow run is made.
    outcome = retrain_trial(source, number, seeds=seeds, full=full,
                            out=Path(str(values["out"])))
    what = "test accuracy" if full else "validation accuracy"
    mean, std = mean_and_std(outcome.accuracies)
    spread = f" ± {std:.4f} (sample std over {seeds} seeds)" if std is not None else ""
    print(f"{what}: {mean:.4f}{spread}; per seed: "
          + ", ".join(f"{a:.4f}" for a in outcome.accuracies))
    if full:
        print(f"models saved in {outcome.folder}/; classify images with: python -m search.predict "
              f"model={outcome.folder / model_file(number, 0)} images=FOLDER")
    recorded = outcome.trial.intermediate_values
    if not full and recorded:
        # Compare at the last epoch the search saw (a pruned trial stopped before the budget).
        epoch = max(recorded)
        retrained = outcome.histories[0][epoch - 1].val_accuracy
        print(f"the search recorded {recorded[epoch]:.4f} at epoch {epoch} for trial {number}; "
              f"seed 1 got {retrained:.4f} there ({retrained - recorded[epoch]:+.4f})")
    return 0


if __name__ == "__main__":
    run_command(main)
