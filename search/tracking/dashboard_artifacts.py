"""optuna-dashboard artifacts: each trial's learning curve and resolved config as Optuna
artifacts, and a note describing the study (`python -m search.dashboard` serves them).

Artifacts live in a `FileSystemArtifactStore` next to the storage: `mlruns/optuna-artifacts/` for
the default `sqlite:///mlruns/optuna.db` (in general `<folder of the .db>/optuna-artifacts/`, and
`mlruns/optuna-artifacts/` under the working directory for a database server). The dashboard needs
the same folder to show them; `search.dashboard` wires it in, and so does

    optuna-dashboard sqlite:///mlruns/optuna.db --artifact-dir mlruns/optuna-artifacts
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.artifacts import upload_artifact
from optuna.trial import TrialState

from search.config.params import PARAMS
from search.config.settings import StudyConfig
from search.config.urls import StoreUrl
from search.storage.backends import artifact_store
from search.storage.trials import TrialAttr
from search.tracking.curves import CurveDrawer
from search.training.results import EpochMetrics, trial_seed

# ---------------------------------------------------------------- what is uploaded

def mlflow_hint(tracking_uri: StoreUrl, experiment_id: str | None = None) -> str:
    """How a person opens the MLflow runs of a study, in Markdown: with the study's experiment
    (`experiment_id`), the link that opens the UI on its runs (see `ui_links.runs_link`)."""
    if tracking_uri.is_off:
        return "MLflow logging was off (`tracking_uri=none`) when this study was created."
    where = " (from the folder the study was run in)" if tracking_uri.is_default else ""
    if experiment_id is not None:
        from search.tracking.ui_links import ui_access

        command, link = ui_access(tracking_uri, experiment_id)
        return (f"Open its runs at {link}." if command is None else
                f"Run `{command}`{where} and open its runs at {link}.")
    if tracking_uri.is_http:
        return f"Open the MLflow server at {tracking_uri}."
    return (f"Run `mlflow ui --backend-store-uri {tracking_uri}`{where} and open "
            "http://127.0.0.1:5000.")


def study_note(config: StudyConfig, experiment_id: str | None = None) -> str:
    """The study's dashboard note (Markdown): model, dataset, budget, space and the MLflow runs."""
    lines = [
        f"## {config.study_name}",
        "",
        f"**{config.model}** on **{config.dataset}**, at most {config.epochs} epochs per trial, "
        f"{config.n_trials} finished trials wanted. Objective: validation accuracy after the "
        f"last epoch trained (maximised). Sampler `{config.sampler.name}`, pruner "
        f"`{config.pruner.name}` over epochs, seed {config.seed}.",
        "",
        "### Search space",
        "",
        "| parameter | values | meaning |",
        "|---|---|---|",
    ]
    lines += [f"| `{spec.name}` | {spec.describe()} | {PARAMS[spec.name].help} |"
              for spec in config.space]
    lines += [
        "",
        "### Each trial",
        "",
        "Artifacts: `trial-NNNN-learning-curve.png` (accuracy and loss per epoch) and "
        "`trial-NNNN-config.yaml` (every parameter, fixed ones included, and the trial's seed). "
        "User attributes: epochs run, best epoch, parameter count, seconds per epoch, images per "
        "second, and the reason of a failure.",
        "",
        "### MLflow runs",
        "",
        f"Experiment `{config.study_name}`. " + mlflow_hint(config.tracking_uri, experiment_id) + " Trial 7 is "
        "the run `trial-0007`, nested under the study's run "
        f"`study-{config.study_name}`; its run id is the trial's user attribute `mlflow_run_id`.",
    ]
    return "\n".join(lines)


def trial_config(config: StudyConfig, number: int, state: TrialState, params: dict[str, Any],
                 attrs: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
    """Everything needed to rerun one trial: the study's fixed choices and the trial's values
    (`seed`: the one the trial recorded; a retry keeps the seed of the trial it repeats)."""
    return {
        "study_name": config.study_name, "trial": number, "state": state.name,
        "model": config.model, "dataset": config.dataset, "epochs": config.epochs,
        "seed": trial_seed(config.seed, number) if seed is None else seed,
        "study_seed": config.seed,
        "val_size": config.val_size, "params": dict(params),
        "results": {str(k): v for k, v in attrs.items()},  # TrialAttr keys as plain YAML
    }


# ---------------------------------------------------------------- the observer

class DashboardArtifacts:
    """A `TrialObserver` uploading each finished trial's learning curve and config as Optuna
    artifacts, and writing the study note once (a note the user edited is never overwritten).

    The learning curve is registered at once (Optuna takes artifacts only while the trial
    runs) as an empty file, which `CurveDrawer` replaces in a helper process while the next
    trial trains; `close` waits for the curves still being drawn.

    A failure here (full disk, unwritable folder) warns and stops the uploads; trials go on.
    """

    def __init__(self, config: StudyConfig, experiment_id: str | None = None,
                 write_note: bool = True) -> None:
        self.config, self.experiment_id = config, experiment_id
        self.folder = config.storage.artifact_dir.resolve()
        self.store = artifact_store(config.storage)
        self.drawer = CurveDrawer()
        self.enabled = True
        self.seconds = 0.0
        self._noted = not write_note  # a worker leaves the note to the main process

    @contextlib.contextmanager
    def _uploading(self, what: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except Exception as error:  # noqa: BLE001 - an artifact is not worth a trial
            self.enabled = False
            print(f"warning: could not save dashboard artifacts while {what} "
                  f"({type(error).__name__}: {error}); no more are saved in this run.",
                  file=sys.stderr)
        finally:
            self.seconds += time.perf_counter() - started

    def trial_started(self, trial: optuna.Trial, params: dict[str, Any]) -> None:
        if self._noted or not self.enabled:
            return
        with self._uploading("writing the study note"):
            import optuna_dashboard  # late: it imports scikit-learn, ~2 s at every start

            if not optuna_dashboard.get_note(trial.study).strip():
                optuna_dashboard.save_note(trial.study, study_note(self.config, self.experiment_id))
            self._noted = True

    def epoch_ended(self, trial: optuna.Trial, metrics: EpochMetrics) -> None:
        pass

    def trial_finished(self, trial: optuna.Trial, state: TrialState, params: dict[str, Any],
                       attrs: dict[str, Any], history: list[EpochMetrics]) -> None:
        if not self.enabled:
            return
        with self._uploading(f"finishing trial {trial.number}"), \
                tempfile.TemporaryDirectory() as folder:
            stem = Path(folder) / f"trial-{trial.number:04d}"
            if history:
                title = f"{self.config.study_name} trial {trial.number}: {state.name.lower()}"
                if "pruned_at_epoch" in attrs:
                    title += f" at epoch {attrs['pruned_at_epoch']}"
                placeholder = stem.with_name(stem.name + "-learning-curve.png")
                placeholder.touch()
                artifact_id = upload_artifact(artifact_store=self.store, study_or_trial=trial,
                                              file_path=str(placeholder))
                # A FileSystemArtifactStore keeps artifact ID under its folder as file ID.
                self.drawer.draw([asdict(m) for m in history], title, self.folder / artifact_id)
            config_path = stem.with_name(stem.name + "-config.yaml")
            config_path.write_text(yaml.safe_dump(
                trial_config(self.config, trial.number, state, params, attrs,
                             trial.user_attrs.get(TrialAttr.SEED)), sort_keys=False))
            # text/plain, not the guessed application/yaml: browsers show it, not download it
            upload_artifact(artifact_store=self.store, file_path=str(config_path),
                            study_or_trial=trial, mimetype="text/plain")

    def close(self) -> None:
        """Waits for the learning curves still being drawn, so that all are on disk."""
        self.drawer.wait()
