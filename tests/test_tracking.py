"""MLflow tracking (search.tracking: stores, study_run, trial_runs, live), read back through
MlflowClient.

End to end: the real CLI in subprocesses against a real `mlflow server` (SQLite backend, free port,
started once per session) and against the default embedded store. In process: the observer's
FAILED/KILLED paths, the checks of the tracking URI, and that a failing store never fails a trial.
"""

from __future__ import annotations

import signal
from pathlib import Path

import optuna
import pytest
import torch
from helpers import (
    AGGRESSIVE_PRUNER,
    FINISHED,
    SMALL,
    finish,
    free_port,
    run_cli,
    start_cli,
    wait_for_running_trial,
)
from mlflow import MlflowClient
from optuna.trial import TrialState

from search.config.command_line import main_guard
from search.config.errors import SearchError
from search.config.settings import StudyConfig, load_config
from search.config.urls import StoreUrl
from search.run import main as run_main
from search.runner.process import make_observers
from search.storage.trials import StudyAttr, TrialAttr
from search.tracking.dashboard_artifacts import DashboardArtifacts
from search.tracking.live import TrialLogger
from search.tracking.stores import check_tracking
from search.tracking.study_run import ParentRun
from search.tracking.trial_runs import backfill, end_study
from search.training.results import EpochMetrics, FinalTraining

# MLflow's own SQLAlchemy store warns about itself; nothing here to act on.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")
EPOCHS = 2
# A cnn3 space whose trials take about a second on a CPU; random sampling with a fixed seed and
# an aggressive pruner, so a few trials give both complete and pruned ones.
ARGS = [*SMALL, f"epochs={EPOCHS}", "sampler=random", *AGGRESSIVE_PRUNER, "space.augment=false"]
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def run_tiny(*args: str, cwd: Path):
    return finish(start_cli("search.run", *ARGS, *args, cwd=cwd))


def tracked_study(tmp_path: Path, tracking_uri: str, name: str) -> tuple[StudyConfig, optuna.Study]:
    """The config of a study named `name` and tracked at `tracking_uri`, and that study, new."""
    storage = f"sqlite:///{tmp_path}/o.db"
    config = load_config([*ARGS, f"storage={storage}", f"tracking_uri={tracking_uri}",
                          f"study_name={name}"])
    return config, optuna.create_study(storage=storage, study_name=name, direction="maximize")


def in_process_cli(*args: str) -> int:
    """`python -m search.run ARGS` in this process: the same entry point and exit code as the
    command, without the ~8 s a subprocess spends importing torch and mlflow."""
    sigterm = signal.getsignal(signal.SIGTERM)  # search.run turns SIGTERM into Ctrl-C
    try:
        return main_guard(run_main, list(args))
    finally:
        signal.signal(signal.SIGTERM, sigterm)


# ---------------------------------------------------------------- reading back

def study_runs(client: MlflowClient, name: str) -> tuple[list, list]:
    """The active parent runs and child runs of a study's experiment."""
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no experiment named {name}"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("search.role") == "study"]
    children = [r for r in runs if r.data.tags.get("search.role") == "trial"]
    return parents, children


def check_study_in_mlflow(client: MlflowClient, study: optuna.Study) -> None:
    """Everything the issue asks of the runs of one study, against the Optuna storage."""
    parents, children = study_runs(client, study.study_name)
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0]
    assert study.user_attrs[StudyAttr.MLFLOW_PARENT_RUN_ID] == parent.info.run_id
    assert parent.data.tags["study_name"] == study.study_name
    assert parent.info.status == "FINISHED"
    assert "config.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(study.best_value)
    best = [t.number for t in study.trials if t.value == study.best_value]  # ties are possible
    assert int(parent.data.tags["best_trial"]) in best

    trials = study.get_trials()
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == [t.number for t in trials]
    by_id = {r.info.run_id: r for r in children}
    by_number = {int(r.data.tags["trial_number"]): r for r in children}
    for trial in trials:
        if TrialAttr.MLFLOW_RUN_ID in trial.user_attrs:  # logged live: the trial leads to its run ...
            run = by_id[trial.user_attrs[TrialAttr.MLFLOW_RUN_ID]]
        else:  # backfilled after an outage (a finished trial can no longer be written to)
            run = by_number[trial.number]
            assert run.data.tags["backfilled"] == "true"
        assert run.data.tags["trial_number"] == str(trial.number)  # ... and back
        assert run.info.run_name == f"trial-{trial.number:04d}"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["state"] == trial.state.name
        assert run.info.status == RUN_STATUS[trial.state.name]
        assert {"device", "torch_version", "study_name"} <= set(run.data.tags)
        if TrialAttr.PRECISION in trial.user_attrs:  # the arithmetic it trained in (bf16, ...)
            assert run.data.tags["precision"] == trial.user_attrs[TrialAttr.PRECISION]
        expected = {**trial.params, **trial.user_attrs.get("fixed_params", {}),
                    "model": "cnn3", "dataset": "fake", "epochs": EPOCHS, "seed": 0}
        assert run.data.params == {k: str(v) for k, v in expected.items()}
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        steps = [m.step for m in sorted(history, key=lambda m: m.step)]
        assert steps == sorted(trial.intermediate_values)
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
            [trial.intermediate_values[s] for s in steps])
        if trial.state == TrialState.PRUNED:
            assert steps[-1] == trial.user_attrs["pruned_at_epoch"] < EPOCHS
            assert run.data.tags["pruned_at_epoch"] == str(steps[-1])
        if trial.state == TrialState.COMPLETE:
            assert steps == list(range(1, EPOCHS + 1))
        for key in ("train_loss", "train_accuracy", "val_loss", "lr", "epoch_seconds",
                    "images_per_second"):
            assert len(client.get_metric_history(run.info.run_id, key)) == len(steps), key
        assert run.data.metrics["epochs_run"] == len(steps)


# ---------------------------------------------------------------- checks before any trial

def test_tracking_uri_that_is_a_directory_or_missing_folder_is_refused(tmp_path):
    with pytest.raises(SearchError, match=r"tracking_uri=.*file store.*tracking_uri=none"):
        check_tracking(StoreUrl(str(tmp_path / "mlruns"), "tracking_uri"))
    with pytest.raises(SearchError, match=r"tracking_uri=sqlite:///.*does not exist"):
        check_tracking(StoreUrl(f"sqlite:///{tmp_path}/missing/mlflow.db", "tracking_uri"))


def test_tracking_off_means_no_mlflow_observer(tmp_path):
    config = load_config([*ARGS, "tracking_uri=none", f"storage=sqlite:///{tmp_path}/o.db"])
    study_run, observers = make_observers(config)
    assert study_run is None and [type(o) for o in observers] == [DashboardArtifacts]


def test_unreachable_server_stops_before_any_trial(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/o.db"
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code = in_process_cli(*ARGS, f"storage={storage}", f"tracking_uri={uri}", "n_trials=2")
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: tracking_uri={uri}: cannot reach") and "tracking_uri=none" in err
    assert "Traceback" not in err
    assert optuna.get_all_study_names(storage) == []  # the study was never created


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_default_embedded_store_keeps_everything_under_mlruns(tmp_path):
    result = run_tiny("n_trials=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "MLflow: 2 trial run(s) logged" in result.stdout
    # The command ends without Python's teardown (`run_command`) but closes both databases first:
    # their write-ahead logs are checkpointed into the files, none is left beside them.
    assert sorted(p.name for p in (tmp_path / "mlruns").glob("*.db*")) == ["mlflow.db", "optuna.db"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    study = optuna.load_study(study_name="cnn3", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    parents, children = study_runs(client, "cnn3")
    assert len(parents) == 1 and len(children) == len(study.trials) == 2
    for run in [*parents, *children]:
        artifacts = Path(run.info.artifact_uri)
        assert artifacts.is_relative_to(tmp_path / "mlruns"), artifacts
    assert (Path(parents[0].info.artifact_uri) / "config.yaml").is_file()
    for trial in study.trials:  # and the dashboard artifacts of each trial, beside the storage
        metas = optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)
        names = sorted(m.filename for m in metas)
        assert names == [f"trial-{trial.number:04d}-config.yaml",
                         f"trial-{trial.number:04d}-learning-curve.png"]
    assert len(list((tmp_path / "mlruns" / "optuna-artifacts").iterdir())) == 4


@pytest.mark.slow
def test_two_workers_then_a_resume_log_every_trial_once(mlflow_server, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/o.db"
    common = [f"storage={storage}", f"tracking_uri={mlflow_server}", "study_name=two-workers"]
    # Two worker processes start the same new study at once: one parent run between them, and
    # each trial's run carries its own trial's number. (The Optuna schema is created first:
    # two processes creating one SQLite storage at once race in Optuna's own migrations.)
    optuna.storages.RDBStorage(storage).engine.dispose()
    workers = [start_cli("search.run", *ARGS, *common, "n_trials=4", cwd=tmp_path)
               for _ in range(2)]
    for result in map(finish, workers):
        assert result.returncode == 0, result.stderr
        assert "View run" not in result.stdout  # MLflow's per-run URL lines are switched off
    client = MlflowClient(mlflow_server)
    study = optuna.load_study(study_name="two-workers", storage=storage)
    assert len(study.trials) >= 4
    check_study_in_mlflow(client, study)
    parent = study.user_attrs[StudyAttr.MLFLOW_PARENT_RUN_ID]

    # Rerunning with a larger budget resumes: same parent, one new run per new trial. (The
    # CLI's entry point in process: the subprocesses above already cover the real command.)
    # What the racing processes sampled depends on their own sampler seeds, so the new trial
    # repeats the worst first epoch so far, with its seed: below most of the others at the
    # first rung, successive halving prunes it, and a pruned run is always checked.
    first_epoch = {t.number: t.intermediate_values[1] for t in study.trials
                   if 1 in t.intermediate_values}
    worst = study.trials[min(first_epoch, key=first_epoch.get)]
    study.enqueue_trial(worst.params, user_attrs={"seed": worst.user_attrs["seed"]})
    finished = len(study.get_trials(states=FINISHED))
    assert in_process_cli(*ARGS, *common, f"n_trials={finished + 1}") == 0
    assert "Resuming study" in capsys.readouterr().out
    study = optuna.load_study(study_name="two-workers", storage=storage)
    assert len(study.get_trials(states=FINISHED)) == finished + 1
    check_study_in_mlflow(client, study)
    assert study.user_attrs[StudyAttr.MLFLOW_PARENT_RUN_ID] == parent
    assert TrialState.PRUNED in {t.state for t in study.trials}


# ---------------------------------------------------------------- the observer in process

def _metrics(epoch: int, val_accuracy: float) -> EpochMetrics:
    return EpochMetrics(epoch=epoch, train_loss=1.0 / epoch, train_accuracy=0.5,
                        val_loss=1.2 / epoch, val_accuracy=val_accuracy, lr=0.1,
                        epoch_seconds=0.5, images_per_second=1000.0)


def _finished(tracker: TrialLogger, trial: optuna.Trial, state: TrialState, params: dict,
              attrs: dict, history: list[EpochMetrics]) -> None:
    """What the objective does as a trial ends: its facts recorded on the trial, then the
    observer told (the storage, not the call's arguments, is what the run is written from)."""
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    tracker.trial_finished(trial, state, params, attrs, history)


def test_failed_and_interrupted_trials_and_dead_workers(mlflow_server, tmp_path):
    config, study = tracked_study(tmp_path, mlflow_server, "in-process")
    study_run = ParentRun(config)
    tracker = TrialLogger(study_run)
    client = MlflowClient(mlflow_server)

    complete = study.ask()
    tracker.trial_started(complete, {"lr": 0.1})
    history = [_metrics(1, 0.3), _metrics(2, 0.6)]
    for metrics in history:
        tracker.epoch_ended(complete, metrics)
    _finished(tracker, complete, TrialState.COMPLETE, {"lr": 0.1}, {"epochs_run": 2}, history)
    run = client.get_run(complete.user_attrs[TrialAttr.MLFLOW_RUN_ID])
    assert run.info.status == "FINISHED" and run.data.tags["state"] == "COMPLETE"
    assert run.data.metrics["epochs_run"] == 2
    study.tell(complete, 0.6)

    diverged = study.ask()
    tracker.trial_started(diverged, {"lr": 10.0})
    tracker.epoch_ended(diverged, _metrics(1, 0.1))
    _finished(tracker, diverged, TrialState.FAIL, {"lr": 10.0},
              {"fail_reason": "diverged: training loss became nan"}, [_metrics(1, 0.1)])
    study.tell(diverged, state=TrialState.FAIL)
    # The live end of a trial is the backfill of that trial: the backfill finds nothing to add.
    assert backfill(study_run, study) == (0, 0)

    orphan = study.ask()  # its worker dies: no trial_finished; Optuna's heartbeat fails it
    tracker.trial_started(orphan, {"lr": 0.2})
    orphan_run = orphan.user_attrs[TrialAttr.MLFLOW_RUN_ID]
    study.tell(orphan, state=TrialState.FAIL)
    assert client.get_run(orphan_run).info.status == "RUNNING"

    end_study(study_run, study, interrupted=True)
    run = client.get_run(diverged.user_attrs[TrialAttr.MLFLOW_RUN_ID])
    assert run.info.status == "FAILED" and run.data.tags["state"] == "FAIL"
    assert run.data.tags["fail_reason"] == "diverged: training loss became nan"
    run = client.get_run(orphan_run)
    assert run.info.status == "FAILED" and "fail_reason" in run.data.tags
    parent = client.get_run(study.user_attrs[StudyAttr.MLFLOW_PARENT_RUN_ID])
    assert parent.info.status == "KILLED"  # Ctrl-C
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(0.6)
    assert parent.data.tags["n_fail"] == "2" and parent.data.tags["n_complete"] == "1"
    assert tracker.trials == 3 and study_run.seconds > 0

    # A new process on the same study (a resume) finds the same parent and reopens it.
    again = ParentRun(config)
    trial = study.ask()
    TrialLogger(again).trial_started(trial, {"lr": 0.3})
    assert again.parent_run_id == parent.info.run_id
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"


def test_a_failing_tracking_store_warns_and_never_fails_the_trial(mlflow_server, tmp_path, capsys):
    config, study = tracked_study(tmp_path, mlflow_server, "store-fails")
    study_run = ParentRun(config)
    tracker = TrialLogger(study_run)

    def broken(*args, **kwargs):
        raise ConnectionError("server went away")

    tracker.client.create_run = broken
    trial = study.ask()
    tracker.trial_started(trial, {"lr": 0.1})
    tracker.epoch_ended(trial, _metrics(1, 0.5))
    tracker.trial_finished(trial, TrialState.COMPLETE, {"lr": 0.1}, {}, [_metrics(1, 0.5)])
    assert not study_run.available()
    assert "MLflow logging failed" in capsys.readouterr().err


def test_a_store_failing_just_after_a_run_is_created_leaves_the_trial_leading_to_it(
        mlflow_server, tmp_path, capsys):
    """The run exists but its params never arrived: the trial still records its run id, so the
    backfill completes that run instead of making a second one for the same trial."""
    config, study = tracked_study(tmp_path, mlflow_server, "fails-after-create")
    study_run = ParentRun(config)
    tracker = TrialLogger(study_run)
    study_run.parent_for(study)  # the study's parent run is there; the trial's run fails halfway
    log_batch = tracker.client.log_batch

    def broken(*args, **kwargs):
        raise ConnectionError("server went away")

    tracker.client.log_batch = broken
    trial = study.ask()
    tracker.trial_started(trial, {"lr": 0.1})
    assert "MLflow logging failed" in capsys.readouterr().err
    run_id = trial.user_attrs[TrialAttr.MLFLOW_RUN_ID]
    study.tell(trial, 0.5)
    tracker.client.log_batch = log_batch
    assert backfill(ParentRun(config), study) == (0, 1)  # completed, none created
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([study_run.experiment_id], "tags.`search.role` = 'trial'")
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED" and "backfilled" not in runs[0].data.tags


def test_final_models_are_logged_under_the_study_parent_and_registered(mlflow_server, tmp_path,
                                                                       capsys):
    from helpers import make_model

    from search.tracking.model_registry import FinalModels, load_logged_model
    from search.training.classifier import class_scores

    config, study = tracked_study(tmp_path, mlflow_server, "finals")
    study.set_user_attr(StudyAttr.MLFLOW_PARENT_RUN_ID, "not-a-real-parent")
    models = FinalModels(config, study)
    model = make_model()  # trial 7, seed 11, test accuracy 0.25 on its card
    models(FinalTraining(model.card, 0, 1.5, 1234, [_metrics(1, 0.5), _metrics(2, 0.7)], model, None))
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("finals")
    [run] = client.search_runs([experiment.experiment_id],
                               filter_string="tags.`search.role` = 'final_evaluation'")
    assert run.data.tags["trial_number"] == "7" and run.data.tags["label"] == "rank 1"
    assert run.data.tags["mlflow.parentRunId"] == "not-a-real-parent"
    assert run.data.metrics["test_accuracy"] == 0.25 and run.data.params["optimizer"] == "adam"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert run.info.status == "FINISHED"

    # Registered twice (two reports): two versions, tagged from the card; loaded back through
    # the server, the same weights.
    assert models.register_best(7) == ("finals-best", "1")
    assert models.register_best(7) == ("finals-best", "2")
    tags = client.get_model_version("finals-best", "2").tags
    assert tags["test_accuracy"] == "0.25" and tags["trial_number"] == "7" and tags["seed"] == "11"
    loaded = load_logged_model("models:/finals-best/2", StoreUrl(mlflow_server, "tracking_uri"))
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    assert loaded.card == model.card and torch.equal(class_scores(loaded, images),
                                                     class_scores(model, images))
    with pytest.raises(SearchError, match="finals-best.*cannot be loaded"):
        load_logged_model("models:/finals-best/3", StoreUrl(mlflow_server, "tracking_uri"))

    # A store that fails mid-report costs the MLflow copy, not the training: a warning naming
    # the saved file, and nothing to register.
    def broken(*args, **kwargs):
        raise ConnectionError("server went away")

    models.client.create_run = broken
    models(FinalTraining(model.card, 1, 1.5, 1234, [], model, "reports/finals/models/x.pt"))
    assert "could not log the final model of trial 7 (seed 2)" in capsys.readouterr().err
    assert models.register_best(7, repeat=1) is None


@pytest.mark.slow
def test_an_mlflow_outage_mid_study_loses_no_run(mlflow_server_process, tmp_path):
    server = mlflow_server_process
    if server.process.poll() is not None:
        server.start()
    storage = f"sqlite:///{tmp_path}/o.db"
    common = [f"storage={storage}", f"tracking_uri={server.url}", "study_name=outage"]
    process = start_cli("search.run", *ARGS, *common, "n_trials=6", cwd=tmp_path)

    wait_for_running_trial(storage, "outage", process,
                           lambda trials: sum(t.state in FINISHED for t in trials) >= 2)
    server.stop()  # the tracking server goes away mid-study: two trials done, the third running
    result = finish(process, timeout=300)
    assert result.returncode == 0, result.stderr  # the study is not hurt
    assert "MLflow logging failed" in result.stderr and "python -m search.sync" in result.stderr
    study = optuna.load_study(study_name="outage", storage=storage)
    assert len(study.get_trials(states=FINISHED)) == 6

    server.start()  # back, on the same port and store
    synced = run_cli("search.sync", "study=cnn3", *common, cwd=tmp_path)
    assert synced.returncode == 0, synced.stderr
    client = MlflowClient(server.url)
    check_study_in_mlflow(client, study)  # every trial has its run, complete, exactly once
    again = run_cli("search.sync", "study=cnn3", *common, cwd=tmp_path)
    assert again.returncode == 0 and "0 run(s) created, 0 completed" in again.stdout
    assert len(study_runs(client, "outage")[1]) == len(study.trials)  # nothing duplicated
