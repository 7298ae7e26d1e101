"""Tests for `python -m search.report`: one small real study (the search.run CLI on fake data,
plus a failed trial and a trial left running as by a killed worker), reported once with
retrain=top2 seeds=2; the tests then read what was written."""

from __future__ import annotations

import csv
import html.parser
import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import matplotlib.image
import optuna
import pytest
from helpers import AGGRESSIVE_PRUNER, FAKE, SMALL_CNN, one_thread, run_cli
from optuna.trial import TrialState

from search.analysis import StudyReport, open_source, write_comparison
from search.analysis import tables as report_data
from search.analysis.render import Table, format_cell, to_markdown
from search.config.command_line import main_guard
from search.report import main as report_main
from search.report import split_studies
from search.training.classifier import load_classifier, score
from search.training.images import load_split

pytestmark = pytest.mark.slow  # the shared study is made by the command, in a subprocess
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A tiny cnn3 so a trial takes about a second on a CPU, an aggressive pruner so some trials are
# pruned, and a baseline that fits this space.
ARGS = [*FAKE, *SMALL_CNN, "epochs=2", "tracking_uri=none", *AGGRESSIVE_PRUNER,
        "baselines=[{optimizer: adam, lr: 0.001, beta1: 0.9, beta2: 0.999, schedule: none, "
        "augment: false, dropout: 0.1, activation: relu}]"]


class Built:
    """The study and the report written from it."""

    def __init__(self, storage: str, out: Path, study: optuna.Study, stdout: str) -> None:
        self.storage, self.out, self.study, self.stdout = storage, out, study, stdout
        self.folder = out / "cnn3"
        self.markdown = (self.folder / "report.md").read_text()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("report")
    storage = f"sqlite:///{tmp / 'optuna.db'}"
    run = run_cli("search.run", "n_trials=4", f"storage={storage}", *ARGS, cwd=tmp)
    assert run.returncode == 0, run.stderr
    study = optuna.load_study(study_name="cnn3", storage=storage)
    states = [t.state for t in study.trials]
    assert TrialState.COMPLETE in states and TrialState.PRUNED in states, states
    template = next(t for t in study.trials if t.state == TrialState.COMPLETE)
    # A trial that failed after one epoch, as a diverging trial does, and one left RUNNING, as
    # a worker killed mid-trial leaves it (an interrupted study).
    for state, attrs in ((TrialState.FAIL, {"epochs_run": 1, "fail_reason": "diverged: loss nan"}),
                         (TrialState.RUNNING, {})):
        study.add_trial(optuna.trial.create_trial(
            state=state, params=template.params, distributions=template.distributions,
            user_attrs=attrs, intermediate_values={1: 0.1}))
    out = tmp / "reports"
    printed = io.StringIO()
    with redirect_stdout(printed), one_thread():
        code = main_guard(report_main, ["study=cnn3", f"storage={storage}", f"out={out}",
                                        "top_k=3", "retrain=top2", "seeds=2"])
    assert code == 0, printed.getvalue()
    return Built(storage, out, optuna.load_study(study_name="cnn3", storage=storage),
                 printed.getvalue())


def optuna_config(built: Built):
    return open_source({"study": "cnn3", "storage": built.storage}).config


def _section(markdown: str, heading: str) -> str:
    start = markdown.index(heading)
    end = markdown.find("\n## ", start + len(heading))
    return markdown[start:end if end >= 0 else None]


def _table_rows(section: str) -> list[dict[str, str]]:
    """The first Markdown table in `section` as dicts (header -> cell)."""
    all_lines = section.splitlines()
    start = next(i for i, line in enumerate(all_lines) if line.startswith("|"))
    lines = []
    for line in all_lines[start:]:
        if not line.startswith("|"):
            break
        lines.append(line)
    split = lambda line: [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]  # noqa: E731
    header = split(lines[0])
    return [dict(zip(header, split(line))) for line in lines[2:]]


# ---------------------------------------------------------------- files

def test_writes_markdown_html_csv_and_figures(built: Built) -> None:
    names = {p.name for p in built.folder.iterdir()}
    assert {"report.md", "report.html", "trials.csv", "final.csv"} <= names
    expected = {"optimization_history.png", "learning_curves.png", "cost_to_best.png",
                "timeline.png", "confusion_matrix.png", "tsne.png"}
    assert expected <= names
    complete = [t for t in built.study.trials if t.state == TrialState.COMPLETE]
    if len(complete) >= 2:  # importances need two complete trials; fewer is reported, not drawn
        assert {"param_importances.png", "slices.png", "parallel_coordinates.png"} <= names
    else:
        assert "Parameter importances: not computed" in built.markdown
    assert "report.md" in built.stdout


def test_every_png_is_a_real_image(built: Built) -> None:
    pngs = sorted(built.folder.glob("*.png"))
    assert len(pngs) >= 6
    for path in pngs:
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, path
        assert pixels.std() > 0.01, f"{path.name} is blank"


def test_trials_csv_has_one_row_per_trial_with_its_state(built: Built) -> None:
    with (built.folder / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    trials = built.study.trials
    assert [int(r["number"]) for r in rows] == [t.number for t in trials]
    assert [r["state"] for r in rows] == [t.state.name for t in trials]
    assert {"FAIL", "RUNNING", "COMPLETE", "PRUNED"} <= {r["state"] for r in rows}
    for row, trial in zip(rows, trials):
        assert int(row["epochs_run"]) == trial.user_attrs.get("epochs_run", len(trial.intermediate_values))
        assert json.loads(row["learning_curve"]) == [trial.intermediate_values[s]
                                                     for s in sorted(trial.intermediate_values)]
        if trial.state == TrialState.COMPLETE:
            assert float(row["value"]) == pytest.approx(trial.value)
            assert float(row["duration_seconds"]) > 0
        for name, value in trial.params.items():
            assert row[f"param_{name}"] == str(value)
        assert row["param_batch_norm"] == "True"  # a fixed value, not an Optuna param
    baseline = [r for r in rows if r["baseline"] == "True"]
    assert [int(r["number"]) for r in baseline] == [0]


# ---------------------------------------------------------------- contents

def test_a_study_too_small_to_judge_says_so_first_and_writes_no_next_study(built: Built) -> None:
    section = _section(built.markdown, "## What to do next")
    assert built.markdown.index("## What to do next") < built.markdown.index("## Summary")
    assert "**Too small to judge:**" in section and "complete trial(s) for" in section
    assert "n_trials=" in section and "|" not in section  # no finding guessed from 4 trials
    assert not (built.folder / "next-study.yaml").exists()


def test_summary_counts_trials_and_what_pruning_saved(built: Built) -> None:
    trials = built.study.trials
    count = lambda state: sum(t.state == state for t in trials)  # noqa: E731
    summary = _section(built.markdown, "## Summary")
    for state, name in ((TrialState.COMPLETE, "complete"), (TrialState.PRUNED, "pruned"),
                        (TrialState.FAIL, "fail"), (TrialState.RUNNING, "running")):
        assert f"{count(state)} {name}" in summary
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    ran = sum(t.user_attrs["epochs_run"] for t in finished)
    assert f"{ran} epochs trained by finished trials instead of {len(finished) * 2}" in summary
    for text in ("cnn3", "fake", "successive_halving", "tpe", "wall time"):
        assert text in summary
    assert "`lr`" in _section(built.markdown, "### Search space")


def test_top_table_lists_the_best_trial_with_its_params_and_command(built: Built) -> None:
    best = built.study.best_trial
    section = _section(built.markdown, "## Top 3 configurations")
    rows = _table_rows(section)
    assert rows[0]["rank"] == "1" and rows[0]["trial"] == str(best.number)
    assert rows[0]["val_accuracy"] == format_cell(best.value)
    assert f"python -m search.train study=cnn3 storage={built.storage} trial={best.number}" in rows[0]["command"]
    assert rows[-1]["rank"] == "baseline" and rows[-1]["trial"] == "0"
    params = _table_rows(section[section.index("### Their parameters"):])
    column = next(c for c in params[0] if c.startswith(f"#1 (trial {best.number}"))
    shown = {row["parameter"]: row[column] for row in params}
    for name, value in best.params.items():
        assert shown[name] == format_cell(value), name


def test_cost_to_best_is_reported(built: Built) -> None:
    cost = report_data.cost_to_best(built.study)
    assert cost is not None and cost.best == built.study.best_value
    assert cost.reached_by in [t.number for t in built.study.trials]
    assert f"after {cost.trials_needed} ended trials" in built.markdown


def test_final_evaluation_reports_test_accuracy_mean_and_std(built: Built) -> None:
    with (built.folder / "final.csv").open() as f:
        rows = list(csv.DictReader(f))
    top2 = report_data.top_trials(built.study, 2)
    assert [int(r["trial"]) for r in rows[:2]] == [t.number for t in top2]
    assert any("baseline" in r["configuration"] and r["trial"] == "0" for r in rows)
    for row in rows:
        accuracies = [float(a) for a in row["per seed"].split(", ")]
        assert len(accuracies) == int(row["seeds"]) == 2
        assert 0 <= float(row["test_accuracy_mean"]) <= 1
        assert float(row["test_accuracy_mean"]) == pytest.approx(sum(accuracies) / 2, abs=1e-4)
        assert float(row["test_accuracy_std"]) >= 0
    section = _section(built.markdown, "## Final evaluation")
    assert "test_accuracy_mean" in section and "test_accuracy_std" in section and " ± " in section
    if "Rank 1 minus baseline" in section:  # the baseline was not itself rank 1
        assert re.search(r"Welch's t-test over the seeds: p = [0-9.e-]+, (not )?significant", section)


def test_every_final_model_is_saved_and_scores_what_the_table_says(built: Built) -> None:
    """Each configuration's seeds are saved with their card; loaded again, each gets exactly the
    test accuracy the final table lists for it (nothing registered: tracking is off here)."""
    with (built.folder / "final.csv").open() as f:
        rows = list(csv.DictReader(f))
    test = load_split("fake", "data", train=False)
    saved = sorted(p.name for p in (built.folder / "models").iterdir())
    assert saved == sorted(f"trial-{int(r['trial']):04d}-seed-{seed}.pt" for r in rows for seed in (1, 2))
    for row in rows:
        for seed, listed in enumerate(row["per seed"].split(", "), 1):
            model = load_classifier(built.folder / f"models/trial-{int(row['trial']):04d}-seed-{seed}.pt")
            accuracy = score(model, test)[1]
            assert accuracy == model.card.test_accuracy and f"{accuracy:.4f}" == listed
            assert model.card.label == row["configuration"] and model.card.train_images == 1024
    assert "Registered" not in built.stdout and "`models/`" in built.markdown


def test_accuracy_against_size_marks_the_pareto_front(built: Built) -> None:
    frontier = report_data.size_frontier(built.study, optuna_config(built))
    complete = [t for t in built.study.trials if t.state == TrialState.COMPLETE]
    assert set(frontier.numbers) == {t.number for t in complete}
    # On the front: no smaller (or equal-sized) trial has a higher accuracy.
    by_number = {t.number: t for t in complete}
    for number in frontier.pareto:
        trial = by_number[number]
        assert not any(o.user_attrs["parameter_count"] <= trial.user_attrs["parameter_count"]
                       and o.value > trial.value for o in complete)
    assert "size_frontier.png" in {p.name for p in built.folder.iterdir()}
    assert "## Accuracy against model size" in built.markdown


def test_interrupted_study_still_reports(built: Built) -> None:
    assert any(t.state == TrialState.RUNNING for t in built.study.trials)
    assert "still running" in built.markdown


def test_html_is_self_contained_and_parses(built: Built) -> None:
    class Collector(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[tuple[str, dict]] = []

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs)))

    text = (built.folder / "report.html").read_text()
    parser = Collector()
    parser.feed(text)
    parser.close()
    tags = [tag for tag, _ in parser.tags]
    assert tags[:1] == ["html"] and "table" in tags
    assert "link" not in tags and not any(tag == "script" for tag in tags)
    for tag, attrs in parser.tags:
        for key in ("src", "href"):
            value = attrs.get(key)
            assert value is None or value.startswith("data:image/png;base64,"), (tag, value)
    images = [attrs["src"] for tag, attrs in parser.tags if tag == "img"]
    assert len(images) == len(list(built.folder.glob("*.png")))
    assert "http://" not in text and "https://" not in text


# ---------------------------------------------------------------- several studies

def test_several_studies_are_split_into_one_location_each() -> None:
    assert split_studies({"study": "cnn3,resnet20", "storage": "sqlite:///x.db", "top_k": 3}) == [
        {"study": "cnn3", "storage": "sqlite:///x.db"},
        {"study": "resnet20", "storage": "sqlite:///x.db"}]
    assert split_studies({"study": "cnn3,cnn3", "study_name": "a,b"}) == [
        {"study": "cnn3", "study_name": "a"}, {"study": "cnn3", "study_name": "b"}]


def test_several_studies_are_compared_side_by_side(built: Built, tmp_path: Path) -> None:
    """The comparison of two studies (here the same one under two names, so the expected values
    are known), from the reports `search.report study=a,b` writes first."""
    optuna.copy_study(from_study_name="cnn3", from_storage=built.storage, to_storage=built.storage,
                      to_study_name="cnn3_copy")
    reports = []
    for name in ("cnn3", "cnn3_copy"):
        source = open_source({"study": "cnn3", "storage": built.storage, "study_name": name})
        reports.append(StudyReport(built.out / name, source.config,
                                   report_data.summarize(source.study, source.config),
                                   source.study.best_trial, None, ()))
    markdown = write_comparison(reports, tmp_path)
    assert markdown == tmp_path / "compare_cnn3_cnn3_copy" / "report.md"
    rows = _table_rows(markdown.read_text())
    assert [r["study"] for r in rows] == ["cnn3", "cnn3_copy"]
    assert rows[0]["best_val_accuracy"] == rows[1]["best_val_accuracy"] == format_cell(
        built.study.best_value)
    assert rows[0]["best trial"] == str(built.study.best_trial.number)
    assert (markdown.parent / "comparison.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "<table>" in (markdown.parent / "report.html").read_text()


# ---------------------------------------------------------------- errors

def test_unknown_study_name_is_a_clean_error(built: Built, capsys) -> None:
    code = main_guard(report_main, ["study=cnn3", f"storage={built.storage}", "study_name=cnn4"])
    assert code == 2
    message = capsys.readouterr().err
    assert "no study named 'cnn4'" in message and "cnn3" in message


def test_missing_storage_is_a_clean_error_and_creates_nothing(tmp_path: Path, capsys) -> None:
    path = tmp_path / "missing.db"
    assert main_guard(report_main, ["study=cnn3", f"storage=sqlite:///{path}"]) == 2
    assert "no such database file" in capsys.readouterr().err
    assert not path.exists()


def test_unknown_study_file_is_a_clean_error(capsys) -> None:
    assert main_guard(report_main, ["study=cnn33"]) == 2
    assert "did you mean 'cnn3'" in capsys.readouterr().err


def test_study_without_finished_trials_is_a_clean_error(tmp_path: Path, capsys) -> None:
    storage = f"sqlite:///{tmp_path / 'empty.db'}"
    study = optuna.create_study(study_name="cnn3", storage=storage, direction="maximize")
    study.tell(study.ask(), state=TrialState.FAIL)
    code = main_guard(report_main, ["study=cnn3", f"storage={storage}", f"out={tmp_path}"])
    assert code == 2
    assert "no finished trial yet (1 fail)" in capsys.readouterr().err
    assert not (tmp_path / "cnn3").exists()


@pytest.mark.parametrize("word, message", [("retrain=best", "expected none or topN"),
                                           ("top_k=0", "whole number >= 1"),
                                           ("epochs=3", "unknown key 'epochs'")])
def test_bad_options_are_clean_errors(word: str, message: str, capsys) -> None:
    assert main_guard(report_main, ["study=cnn3", word]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- rendering

def test_markdown_table_escapes_pipes_and_formats_numbers() -> None:
    import pandas as pd

    text = to_markdown([Table(pd.DataFrame({"a": ["x|y"], "b": [0.123456], "c": [None]}))])
    assert text.splitlines()[2] == "| x\\|y | 0.1235 |  |"


def test_html_escapes_text_and_renders_inline_marks(tmp_path: Path) -> None:
    from search.analysis.render import Text, to_html

    page = to_html([Text("a <b> & `x=1` **bold** *note*")], "t", tmp_path)
    assert "a &lt;b&gt; &amp; <code>x=1</code> <strong>bold</strong> <em>note</em>" in page
