"""optuna-dashboard: each trial's learning curve and resolved config as Optuna artifacts, a note
describing the study, and `python -m search.dashboard study=NAME` to browse it all.

Artifacts live in a `FileSystemArtifactStore` next to the storage: `mlruns/optuna-artifacts/` for
the default `sqlite:///mlruns/optuna.db` (in general `<folder of the .db>/optuna-artifacts/`, and
`mlruns/optuna-artifacts/` under the working directory for a database server). The dashboard needs
the same folder to show them; this module's command wires it in, and so does

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
import optuna_dashboard
import yaml
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import TrialState

from search.cli import help_text, main_guard
from search.config import DEFAULT_TRACKING_URI, StudyConfig, load_config
from search.curves import CurveDrawer
from search.errors import SearchError
from search.objective import trial_seed
from search.study import existing_study_id
from search.trainer import EpochMetrics

ARTIFACT_DIR_NAME = "optuna-artifacts"


# ---------------------------------------------------------------- where artifacts live

def artifact_dir(storage: str) -> Path:
    """The artifact folder that belongs to an Optuna storage URL (see the module docstring)."""
    if storage.startswith("sqlite:///"):
        database = storage[len("sqlite:///"):].split("?")[0]
        if database and database != ":memory:":
            return Path(database).expanduser().parent / ARTIFACT_DIR_NAME
    return Path("mlruns") / ARTIFACT_DIR_NAME


def artifact_store(storage: str) -> FileSystemArtifactStore:
    folder = artifact_dir(storage)
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(folder)


# ---------------------------------------------------------------- what is uploaded

def mlflow_hint(tracking_uri: str) -> str:
    """How a person opens the MLflow runs of a study, in Markdown."""
    if tracking_uri.lower() == "none":
        return "MLflow logging was off (`tracking_uri=none`) when this study was created."
    if tracking_uri.startswith(("http://", "https://")):
        return f"Open the MLflow server at {tracking_uri}."
    where = (" (from the folder the study was run in)" if tracking_uri == DEFAULT_TRACKING_URI
             else "")
    return (f"Run `mlflow ui --backend-store-uri {tracking_uri}`{where} and open "
            "http://127.0.0.1:5000.")


def study_note(config: StudyConfig) -> str:
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
        "| parameter | values |",
        "|---|---|",
    ]
    lines += [f"| `{spec.name}` | {spec.describe()} |" for spec in config.space]
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
        f"Experiment `{config.study_name}`. " + mlflow_hint(config.tracking_uri) + " Trial 7 is "
        "the run `trial-0007`, nested under the study's run "
        f"`study-{config.study_name}`; its run id is the trial's user attribute `mlflow_run_id`.",
    ]
    return "\n".join(lines)


def trial_config(config: StudyConfig, number: int, state: TrialState, params: dict[str, Any],
                 attrs: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to rerun one trial: the study's fixed choices and the trial's values."""
    return {
        "study_name": config.study_name, "trial": number, "state": state.name,
        "model": config.model, "dataset": config.dataset, "epochs": config.epochs,
        "seed": trial_seed(config.seed, number), "study_seed": config.seed,
        "val_size": config.val_size, "params": dict(params),
        "results": {k: v for k, v in attrs.items()},
    }


# ---------------------------------------------------------------- the observer

class DashboardArtifacts:
    """A `TrialObserver` uploading each finished trial's learning curve and config as Optuna
    artifacts, and writing the study note once (a note the user edited is never overwritten).

    The learning curve is registered at once (Optuna takes artifacts only while the trial
    runs) as an empty file, which `CurveDrawer` replaces in a helper process while the next
    trial trains; `study_ended` waits for the curves still being drawn.

    A failure here (full disk, unwritable folder) warns and stops the uploads; trials go on.
    """

    def __init__(self, config: StudyConfig) -> None:
        self.config = config
        self.folder = artifact_dir(config.storage).resolve()
        self.store = artifact_store(config.storage)
        self.drawer = CurveDrawer()
        self.enabled = True
        self.seconds = 0.0
        self._noted = False

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
            if not optuna_dashboard.get_note(trial.study).strip():
                optuna_dashboard.save_note(trial.study, study_note(self.config))
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
                trial_config(self.config, trial.number, state, params, attrs), sort_keys=False))
            # text/plain, not the guessed application/yaml: browsers show it, not download it
            upload_artifact(artifact_store=self.store, file_path=str(config_path),
                            study_or_trial=trial, mimetype="text/plain")

    def study_ended(self, study: optuna.Study, interrupted: bool) -> None:
        """Waits for the learning curves still being drawn, so that all are on disk."""
        self.drawer.wait()


# ---------------------------------------------------------------- `python -m search.dashboard`

SERVER_KEYS = {"port": 8080, "host": "127.0.0.1"}
KEY_HELP = {
    "study": "the study file (its name is the default study_name)",
    "storage": "Optuna storage URL (default: sqlite:///mlruns/optuna.db)",
    "study_name": "the study in that storage (default: the study file's name)",
    "port": "port to listen on (default: 8080)",
    "host": "address to bind (default: 127.0.0.1; 0.0.0.0 to reach it from other machines)",
}
EXAMPLES = ["study=cnn3", "study=cnn3 storage=sqlite:///runs/optuna.db port=8081"]
SUMMARY = ("Starts optuna-dashboard on a study's storage with its artifact folder wired in, so "
           "each trial's learning curve and config show next to its values. All studies of the "
           "storage are browsable; the link printed goes straight to this one.")


def _server_options(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    options, rest = dict(SERVER_KEYS), []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in SERVER_KEYS:
            rest.append(arg)
        elif key == "port":
            if not (value.isdigit() and 1 <= int(value) <= 65535):
                raise SearchError(f"port={value}: expected a port number from 1 to 65535.")
            options["port"] = int(value)
        elif not value:
            raise SearchError("host=: expected an address such as 127.0.0.1 or 0.0.0.0.")
        else:
            options["host"] = value
    return options, rest


def open_storage(config: StudyConfig) -> tuple[optuna.storages.BaseStorage, int]:
    """The study's storage and id; a missing file or study is a user error, not a new study."""
    storage_url = config.storage
    if storage_url.startswith("sqlite:///"):
        database = Path(storage_url[len("sqlite:///"):].split("?")[0]).expanduser()
        if not database.is_file():
            raise SearchError(f"storage={storage_url}: no such file ({database.resolve()}). Run "
                              f"`python -m search.run study={config.study}` first, or point "
                              "storage= at the study's database.")
    try:
        storage = optuna.storages.RDBStorage(storage_url)
    except Exception as error:  # noqa: BLE001 - any driver error: cannot use this storage
        raise SearchError(f"storage={storage_url}: cannot open ({error}).") from None
    study_id = existing_study_id(storage, config.study_name)
    if study_id is None:
        names = optuna.get_all_study_names(storage)
        raise SearchError(f"study_name={config.study_name}: no such study in {storage_url} "
                          f"(studies there: {', '.join(names) or 'none'}); add study_name=NAME.")
    return storage, study_id


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text("search.dashboard", SUMMARY, KEY_HELP, EXAMPLES, options=()))
        return 0
    unknown = [a for a in argv if a.startswith("-")]
    if unknown:
        raise SearchError(f"unknown option {unknown[0]}; options: --help.")
    options, rest = _server_options(argv)
    config = load_config(rest)
    storage, study_id = open_storage(config)
    folder = artifact_dir(config.storage)
    print(f"optuna-dashboard for study '{config.study_name}' in {config.storage} "
          f"(artifacts: {folder}):\n  http://{options['host']}:{options['port']}/dashboard/"
          f"studies/{study_id}\nCtrl-C stops it.", flush=True)
    try:
        optuna_dashboard.run_server(storage, host=options["host"], port=options["port"],
                                    artifact_store=artifact_store(config.storage))
    except OSError as error:
        raise SearchError(f"port={options['port']}: cannot listen on {options['host']} ({error}); "
                          "try another port=.") from None
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
