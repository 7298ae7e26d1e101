"""One study's report: compute the data, draw the figures, lay out the blocks, write the files
(`report.md`, `report.html`, `trials.csv`, `final.csv` when retrained, and the PNGs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial

from search.analysis import advice, figures, final_tables, next_study, tables
from search.analysis.render import (
    Block,
    Code,
    Heading,
    Image,
    Table,
    Text,
    format_seconds,
    to_html,
    to_markdown,
)
from search.config.errors import SearchError, first_line
from search.config.settings import StudyConfig, load_config, to_yaml
from search.training.results import MODELS_FOLDER, FinalEvaluation, FinalResult
from search.storage.reading import StudySource, retrain_command
from search.storage.trials import TrialAttr
from search.training.images import DATASETS

# Slice plots and parallel coordinates show this many of the most important parameters.
MOST_IMPORTANT = 4
PARALLEL_PARAMS = 8


class ReportOptions(NamedTuple):
    top_k: int = 5
    retrain: int = 0                            # retrain the top N on train+val; 0: no final evaluation
    seeds: int = 3
    out: Path = Path("reports")


class StudyReport(NamedTuple):
    """What was written, and what a comparison of several studies needs."""

    folder: Path
    config: StudyConfig
    summary: tables.Summary
    best: FrozenTrial | None
    evaluation: FinalEvaluation | None
    figures: tuple[str, ...]
    next_study: Path | None = None              # the study file the findings wrote, if any

    @property
    def markdown(self) -> Path:
        return self.folder / "report.md"

    @property
    def html(self) -> Path:
        return self.folder / "report.html"


class _Figures:
    """Draws figures into the report folder; a figure that cannot be drawn becomes a note in the
    report (a report of a half-finished study must still come out), never a crash."""

    def __init__(self, folder: Path, log: Callable[[str], None]) -> None:
        self.folder, self.log, self.written = folder, log, []

    def add(self, blocks: list[Block], file: str, caption: str, draw: Callable[[], Figure]) -> None:
        try:
            figures.save_png(draw(), self.folder / file)
        except Exception as error:  # noqa: BLE001 - one broken plot must not sink the report
            figures.plt.close("all")
            reason = first_line(error)
            self.log(f"warning: figure {file} not drawn: {reason}")
            blocks.append(Text(f"*{caption.split(':')[0]}: not drawn ({reason}).*"))
            return
        self.written.append(file)
        blocks.append(Image(file, caption))


# ---------------------------------------------------------------- sections

def _summary_blocks(summary: tables.Summary, config: StudyConfig) -> list[Block]:
    counts = ", ".join(f"{n} {state}" for state, n in summary.counts.items())
    rows = [
        ("model", config.model),
        ("dataset", f"{config.dataset} (validation split of "
                    f"{config.val_size or DATASETS[config.dataset].val_size} training images, seed "
                    f"{config.seed}; the test set is not used by the search)"),
        ("epoch budget", f"{config.epochs} epochs per trial"),
        ("sampler", summary.sampler),
        ("pruner", summary.pruner),
        ("trials", f"{counts} ({summary.finished} finished of n_trials={config.n_trials})"),
        ("best", f"trial {summary.best_trial}: validation accuracy {summary.best_value:.4f}"
         if summary.best_value is not None else "no complete trial yet"),
        ("wall time", f"{format_seconds(summary.wall_seconds)} (first trial start to last trial end); "
                      f"{format_seconds(summary.compute_seconds)} of trial time in total"),
        ("pruning", f"{summary.epochs_run} epochs trained by finished trials instead of "
                    f"{summary.epochs_without_pruning} without pruning "
                    f"({summary.finished} x {config.epochs}): {summary.epochs_saved:.0%} saved"),
    ]
    blocks: list[Block] = [Heading("Summary"),
                           Table(pd.DataFrame(rows, columns=["", "value"]))]
    running, waiting = summary.counts.get("running", 0), summary.counts.get("waiting", 0)
    if running or waiting:
        blocks.append(Text(
            f"**Note:** {running} trial(s) still running (or whose process died without "
            f"recording it)" + (f" and {waiting} queued" if waiting else "")
            + ": the study is running or was interrupted; this report covers the trials "
            "recorded so far."))
    blocks += [Heading("Search space", 3),
               Table(pd.DataFrame(summary.space, columns=["parameter", "values", "meaning"]),
                     code_columns=("parameter",))]
    return blocks


def _top_blocks(study, config: StudyConfig, options: ReportOptions) -> list[Block]:
    top = tables.top_trials(study, options.top_k)
    baselines = [t for t in tables.baseline_trials(study) if t.params]
    blocks: list[Block] = [Heading(f"Top {options.top_k} configurations")]
    if not top:
        return blocks + [Text("No trial has completed yet, so there is nothing to rank.")]
    blocks.append(Text(
        "Ranked by validation accuracy after the last epoch (the search's objective); "
        "`best_val_accuracy` is the best epoch's. Each command trains that configuration again "
        "with the trial's seed (add `full=true` to train on train + validation and test it)."))
    table = tables.top_table(top, baselines, config)
    blocks.append(Table(table, code_columns=("command",)))
    listed = top + [t for t in baselines if t.number not in {x.number for x in top}]
    labels = [f"#{rank} (trial {t.number}{', baseline' if tables.is_baseline(t) else ''})"
              for rank, t in enumerate(top, 1)]
    labels += [f"baseline (trial {t.number})" for t in listed[len(top):]]
    blocks += [Heading("Their parameters", 3), Table(tables.params_table(listed, config, labels),
                                                     index=True)]
    best = top[0]
    for trial in baselines:
        value = table.loc[table["trial"] == trial.number, "val_accuracy"].iloc[-1]
        if value is not None and not pd.isna(value) and trial.number != best.number:
            blocks.append(Text(
                f"The best configuration's validation accuracy is {best.value - value:+.4f} "
                f"against the baseline (trial {trial.number}, {trial.state.name.lower()}"
                f"{'' if trial.state.name == 'COMPLETE' else ', its last reported epoch'}); "
                "one seed each, so see the final evaluation for how much of that is noise."))
    if not baselines:
        blocks.append(Text("This study has no baseline trial (none configured, or the baseline "
                           "did not fit the space it was run with)."))
    return blocks


def _figure_blocks(study, config: StudyConfig, drawer: _Figures) -> list[Block]:
    blocks: list[Block] = [Heading("How the search went")]
    cost = tables.cost_to_best(study)
    if cost is not None:
        blocks.append(Text(
            f"**Cost to best:** the search was within {cost.tolerance:g} (one percentage point) "
            f"of its best validation accuracy ({cost.best:.4f}) after {cost.trials_needed} ended trials "
            f"and {format_seconds(cost.seconds_needed)} of wall time (trial {cost.reached_by})."))
        drawer.add(blocks, "cost_to_best.png",
                   "Cost to best: best validation accuracy so far against trials ended and "
                   "wall time; the band is within one percentage point of the best",
                   lambda: figures.draw_cost_to_best(cost))
    drawer.add(blocks, "optimization_history.png",
               "Optimisation history: validation accuracy of each complete trial and the best so far",
               lambda: figures.draw_optimization_history(study))
    curves = tables.learning_curves(study)
    if curves:
        drawer.add(blocks, "learning_curves.png",
                   "Learning curves: validation accuracy per epoch of every trial (Optuna's "
                   "intermediate values); a cross marks where the pruner stopped a trial",
                   lambda: figures.draw_learning_curves(curves, config.epochs))
    drawer.add(blocks, "timeline.png", "Timeline: when each trial ran, coloured by its state",
               lambda: figures.draw_timeline(study))

    frontier = tables.size_frontier(study, config)
    if frontier is not None:
        blocks.append(Heading("Accuracy against model size"))
        best = max(zip(frontier.values, frontier.numbers, frontier.parameter_counts))
        budget = (f"Every model trained stayed within the budget of max_params = "
                  f"{frontier.budget:,} (larger ones were not trained); the best under it is "
                  if frontier.budget is not None else "The best is ")
        blocks.append(Text(f"{budget}trial {best[1]}, {best[2]:,} parameters, validation accuracy "
                           f"{best[0]:.4f}. The Pareto front lists the trials that no smaller "
                           "trial beats: the sizes worth choosing between."))
        drawer.add(blocks, "size_frontier.png",
                   "Accuracy against parameter count of every complete trial, with the Pareto "
                   "front", lambda: figures.draw_size_frontier(frontier))
        blocks.append(Table(tables.frontier_table(frontier)))
    blocks.append(Heading("Which parameters matter"))
    importances = tables.param_importances(study, seed=config.seed)
    summary_complete = len(tables.complete_trials(study))
    if importances.values:
        drawer.add(blocks, "param_importances.png",
                   f"Parameter importances (fANOVA over the {summary_complete} complete trials; "
                   "parameters present in every complete trial; with few trials, a rough guide)",
                   lambda: figures.draw_importances(study, importances, config.seed))
    else:
        blocks.append(Text(f"*Parameter importances: not computed ({importances.reason}).*"))
    important = tables.important_params(study, importances, MOST_IMPORTANT)
    parallel = tables.important_params(study, importances, PARALLEL_PARAMS)
    if important:
        drawer.add(blocks, "slices.png",
                   f"Slice plots of the {len(important)} most important parameters: validation "
                   "accuracy of each complete trial against the parameter's value",
                   lambda: figures.draw_slices(study, important))
        drawer.add(blocks, "parallel_coordinates.png",
                   "Parallel coordinates of the most important parameters, coloured by validation "
                   "accuracy", lambda: figures.draw_parallel_coordinates(study, parallel))
    else:
        blocks.append(Text("*Slice and parallel-coordinate plots: no parameter took two different "
                           "values in complete trials yet.*"))
    effects = tables.categorical_effects(study, config)
    if effects:
        drawer.add(blocks, "categorical_params.png",
                   "Validation accuracy of complete trials per value of each categorical parameter "
                   "(box: quartiles; dots: trials)", lambda: figures.draw_categorical_effects(effects))
        blocks.append(Table(tables.categorical_table(effects)))
    else:
        blocks.append(Text("*Accuracy per categorical value: no categorical parameter took two "
                           "values in complete trials yet.*"))
    return blocks


def final_entries(study, retrain: int) -> list[tuple[str, FrozenTrial]]:
    """What the report's final evaluation retrains: the top `retrain` configurations, then each
    baseline not among them; none without a complete trial to rank (nor with `retrain=none`)."""
    top = tables.top_trials(study, retrain)
    if not top:
        return []
    entries = [(f"rank {rank}", t) for rank, t in enumerate(top, 1)]
    chosen = {t.number for t in top}
    baselines = [t for t in tables.baseline_trials(study) if t.params]
    for trial in baselines:
        label = "baseline" if len(baselines) == 1 else f"baseline {trial.user_attrs[TrialAttr.BASELINE]}"
        if trial.number in chosen:
            entries = [(f"{name} = {label}" if t.number == trial.number else name, t)
                       for name, t in entries]
        else:
            entries.append((label, trial))
    return entries


def significance(best: FinalResult, baseline: FinalResult) -> str:
    """Welch's t-test of the two configurations' test accuracies over seeds, in one sentence."""
    if len(best.test_accuracies) < 2 or len(baseline.test_accuracies) < 2:
        return " One seed each: no significance can be computed (use seeds=3 or more)."
    from scipy.stats import ttest_ind

    p = ttest_ind(best.test_accuracies, baseline.test_accuracies, equal_var=False).pvalue
    if p != p:  # every seed gave the same accuracy in both
        return " The seeds did not vary: no significance can be computed."
    verdict = ("significant at the 5% level" if p < 0.05 else "not significant at the 5% level")
    return (f" Welch's t-test over the seeds: p = {p:.3g}, {verdict}"
            f"{' (the search found a better configuration)' if p < 0.05 and best.mean > baseline.mean else ''}.")


def _final_blocks(config: StudyConfig, options: ReportOptions, drawer: _Figures,
                  evaluation: FinalEvaluation | None) -> list[Block]:
    blocks: list[Block] = [Heading("Final evaluation on the test set")]
    if not options.retrain:
        return blocks + [Text("Not run (`retrain=none`). Add `retrain=top3` to retrain the three "
                              "best configurations on train + validation and test them.")]
    if evaluation is None:
        return blocks + [Text("Not run: no trial has completed yet.")]
    table = final_tables.final_table(evaluation)
    table.to_csv(drawer.folder / "final.csv", index=False)
    blocks.append(Text(
        f"Each configuration was trained again on the whole training set ({evaluation.train_images} "
        f"images: train + validation) for the full budget of {evaluation.epochs} epochs with "
        f"{evaluation.seeds} seed(s), and each model was evaluated once on the "
        f"{evaluation.test_images} test images. Mean ± sample standard deviation over seeds."))
    blocks.append(Text(
        f"Every one of these models is saved in `{MODELS_FOLDER}/` (`trial-NNNN-seed-K.pt`: the "
        "weights with the model's card: parameters, normalisation, class names, test accuracy). "
        "Load one with `search.load_model(path)`, or classify images with `python -m "
        f"search.predict model={MODELS_FOLDER}/<file> images=<folder>`."
        + (" With MLflow tracking on, each is also logged on its final run, and rank 1's first "
           "seed is registered as `" + config.study_name + "-best`." if config.tracking_enabled else "")))
    blocks.append(Table(table))
    baseline = next((r for r in evaluation.results if "baseline" in r.label), None)
    best = evaluation.results[0]
    if baseline is not None and baseline is not best:
        spread = ""
        if best.std is not None and baseline.std is not None:
            spread = (f" (standard deviation over seeds: {best.std:.4f} for rank 1, "
                      f"{baseline.std:.4f} for the baseline; with {evaluation.seeds} seeds, a "
                      "difference of less than about two standard deviations is not a reliable "
                      "improvement)")
        blocks.append(Text(f"Rank 1 minus baseline: {best.mean - baseline.mean:+.4f} mean test "
                           f"accuracy{spread}." + significance(best, baseline)))
    if evaluation.predictions is not None:
        predictions = evaluation.predictions
        names = DATASETS[config.dataset].classes
        who = f"{predictions.label} (trial {predictions.trial_number}), first seed"
        matrix = final_tables.confusion(predictions, len(names))
        drawer.add(blocks, "confusion_matrix.png",
                   f"Confusion matrix on the test set of {who}; rows are true classes, "
                   "normalised to sum to 1",
                   lambda: figures.draw_confusion_matrix(matrix, names, f"Confusion matrix: {who}"))
        drawer.add(blocks, "tsne.png",
                   f"t-SNE of the penultimate-layer features of {who} on "
                   f"{len(predictions.features)} test images, coloured by true class",
                   lambda: figures.draw_tsne(final_tables.tsne_embedding(predictions, seed=config.seed),
                                             predictions.feature_labels, names,
                                             f"t-SNE of penultimate features: {who}"))
    return blocks


# ---------------------------------------------------------------- what to do next

def _finding_rows(steps: advice.NextSteps, config: StudyConfig) -> list[tuple[str, str, str]]:
    """(finding, evidence, what the next study does) for every finding."""
    rows = []
    for b in steps.boundaries:
        if b.side or b.changed or b.blocked:
            finding = next_study.where(b) + (f": best trials at the {b.side} edge" if b.side
                                             else ": range cut back")
            change, _, evidence = next_study.boundary_text(b).partition(": ")
            rows.append((finding, evidence + f"; top values {', '.join(f'{v:.3g}' for v in b.top)}",
                         change))
    for region in steps.regions:
        rows.append((f"{next_study.where(region)}: "
                     f"{'stability' if region.kind == 'stability' else 'size'} limit",
                     next_study.region_text(region).split(": ", 1)[1],
                     "not widened into it; the range ends before it"))
    for c in steps.choices:
        text = next_study.choice_text(c)
        action, _, evidence = text.partition(": ")
        finding = {"does not matter": "does not matter", "fails": "a choice that fails",
                   "at the edge of its choices": "best trials at the edge of its choices",
                   "never among the best": "a choice never among the best",
                   "always among the best": "a choice always among the best"}[c.why]
        rows.append((f"{c.param}: {finding}", evidence, action))
    judged = [c for c in steps.curves if c.verdict != "too short to judge"]
    for curve in judged:
        rows.append((f"trial {curve.number} ({curve.value:.4f}): {curve.verdict}", curve.evidence,
                     _curve_advice(curve.verdict)))
    if len(judged) < len(steps.curves):
        short = [c for c in steps.curves if c not in judged]
        rows.append((f"training curves of trial(s) {', '.join(str(c.number) for c in short)}: "
                     "not judged", short[0].evidence, ""))
    if steps.epochs is not None:
        rows.append(("epoch budget", steps.epochs.reason,
                     f"epochs {steps.epochs.current} -> {steps.epochs.proposed}"))
    s = steps.samples
    rise = (f"best {s.best:.4f}; {s.tail_gain:+.4f} over the last {s.tail_trials} finished trials"
            if s.best is not None and s.best_before_tail is not None else "no earlier best")
    rows.append(("samples" + (": more trials would likely pay" if s.more_trials else ""),
                 f"{s.complete} complete trials for {s.dimensions} searched parameters "
                 f"({s.per_dimension:.1f} each); {rise}",
                 f"n_trials {config.n_trials} -> {steps.n_trials}" if steps.n_trials != config.n_trials
                 else f"n_trials {config.n_trials} kept"))
    return rows


CURVE_ADVICE = {
    "still improving": "train longer",
    "overfitting": "regularise: more weight_decay, dropout or augmentation",
    "saturated early": "train shorter",
    "noisy late": "a smaller late learning rate (a decaying schedule), a bigger batch, or more "
                  "validation data",
    "settled": "the budget fits",
    "too short to judge": "",
}


def _curve_advice(verdict: str) -> str:
    return CURVE_ADVICE[verdict]


def _next_blocks(study, config: StudyConfig, drawer: _Figures, log: Callable[[str], None]) -> tuple[list[Block], Path | None]:
    """The "What to do next" section, and the next study's file when the study could be judged."""
    blocks: list[Block] = [Heading("What to do next")]
    steps = advice.next_steps(study, config)
    path = drawer.folder / next_study.FILE
    if steps.too_small:
        path.unlink(missing_ok=True)  # an older report's advice no longer holds
        return blocks + [Text(
            f"**Too small to judge:** {steps.too_small}. No advice about ranges, choices or "
            "training curves is given from so few trials. Resume this study with more: "
            f"`python -m search.run {config.location_args()} n_trials={steps.n_trials}`.")], None
    path.write_text(next_study.next_study_yaml(config, steps, str(path)), encoding="utf-8")
    checked = ""
    try:
        load_config([f"study={path}"])
    except SearchError as error:
        log(f"warning: {path} does not load: {first_line(error)}")
        checked = f" **It does not load** ({first_line(error)}); edit it before running it."
    blocks.append(Text(
        "The checks an experienced researcher makes after a study (Google's *Deep Learning "
        f"Tuning Playbook*), read from its {steps.samples.complete} complete trials: best trials "
        "at the edge of a range (in log space for a log range, per optimizer for a range per "
        "optimizer), regions where trials fail, choices never or always among the best, "
        "parameters that do not matter, the best trials' training curves, and whether more "
        f"trials would pay. The next study is written with each change and its reason: "
        f"`python -m search.run study={path}` (it warm-starts from this study's best "
        f"configurations).{checked}"))
    rows = _finding_rows(steps, config)
    blocks.append(Table(pd.DataFrame(rows, columns=["finding", "evidence", "next study"])))
    inside = [next_study.where(b) for b in steps.boundaries if not (b.side or b.changed)]
    if inside:
        blocks.append(Text(f"No edge: {', '.join(inside)} (the best trials lie inside the range)."))
    if steps.skipped:
        blocks.append(Text("Not judged: " + "; ".join(steps.skipped) + "."))
    fixed = {c.param for c in steps.choices if c.why == "does not matter"}
    shown = [b for b in steps.boundaries if b.side or b.changed or b.param in fixed]
    if shown:
        drawer.add(blocks, "next_ranges.png",
                   "Slice plots of the ranges with a finding: each complete trial's value against "
                   "its validation accuracy (best trials ringed, failed ones as red crosses), the "
                   "range's bounds (solid), its outer fifth (grey), the next study's bounds "
                   "(dashed) and a region that fails (red)",
                   lambda: figures.draw_boundaries(shown))
    named = {c.param for c in steps.choices}
    effects = [e for e in tables.categorical_effects(study, config) if e.param in named]
    if effects:
        drawer.add(blocks, "next_choices.png",
                   "Validation accuracy per value of the categorical parameters with a finding",
                   lambda: figures.draw_categorical_effects(effects))
    if steps.curves:
        drawer.add(blocks, "next_curves.png",
                   f"Training curves of the best {len(steps.curves)} trials, each titled with "
                   "how it reads", lambda: figures.draw_best_curves(steps.curves))
    cost = tables.cost_to_best(study)
    if cost is not None:
        drawer.add(blocks, "next_progress.png",
                   "Best validation accuracy so far against trials ended; the last part of the "
                   "study shaded", lambda: figures.draw_progress(cost, steps.samples))
    return blocks, path


# ---------------------------------------------------------------- the whole report

def check_reportable(source: StudySource) -> tables.Summary:
    """The study's summary, once it has a trial to report on.

    Raises:
        SearchError: the study has no finished (complete or pruned) trial.
    """
    study, config = source.study, source.config
    summary = tables.summarize(study, config)
    if summary.finished == 0:
        counts = ", ".join(f"{n} {s}" for s, n in summary.counts.items()) or "no trials"
        raise SearchError(f"study '{study.study_name}' in {config.storage} has no finished trial yet "
                          f"({counts}); a report needs at least one complete or pruned trial. "
                          f"Run or resume it: python -m search.run {config.location_args()}")
    return summary


def write_report(source: StudySource, options: ReportOptions, *,
                 evaluation: FinalEvaluation | None = None,
                 log: Callable[[str], None] = print) -> StudyReport:
    """Writes `<out>/<study_name>/` and returns what was written; `evaluation` is the final
    evaluation of `final_entries` (`search.runner.final_models.train_final_models`), if run.

    Raises:
        SearchError: the study has no finished (complete or pruned) trial.
    """
    study, config = source.study, source.config
    summary = check_reportable(source)
    folder = options.out / study.study_name
    folder.mkdir(parents=True, exist_ok=True)
    tables.trials_frame(study, config).to_csv(folder / "trials.csv", index=False)
    drawer = _Figures(folder, log)

    blocks: list[Block] = [
        Heading(f"Hyperparameter search: `{study.study_name}` ({config.model} on {config.dataset})", 1),
        Text(f"Generated {tables.now()} from `{config.storage}`, study `{study.study_name}`. "
             "Every trial is in `trials.csv` (one row per trial, with its parameters and "
             "learning curve)."),
    ]
    if not source.config_from_storage:
        blocks.append(Text("**Note:** this study stored no config; it is read with today's study "
                           f"file `{config.study}`, which may differ from the one it ran with."))
    next_blocks, next_file = _next_blocks(study, config, drawer, log)
    blocks += next_blocks
    blocks += _summary_blocks(summary, config)
    blocks += _top_blocks(study, config, options)
    blocks += _figure_blocks(study, config, drawer)
    blocks += _final_blocks(config, options, drawer, evaluation)
    best = study.best_trial if summary.best_trial is not None else None
    blocks += [Heading("Reproduce"), Code("\n".join(filter(None, [
        f"python -m search.report {config.location_args()} retrain=top3    # this report, tested",
        retrain_command(config, best.number) + "    # the best trial again" if best else "",
        retrain_command(config, best.number, full=True) + "    # ... on train+val, tested"
        if best else "",
    ]))), Text("The study's resolved config, as stored with it (rerun `search.run` with these "
               "values, or the overrides that produced them, to resume or extend the search):"),
        Code(to_yaml(config).rstrip())]

    (folder / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    title = f"{study.study_name}: {config.model} on {config.dataset}"
    (folder / "report.html").write_text(to_html(blocks, title, folder), encoding="utf-8")
    return StudyReport(folder, config, summary, best, evaluation, tuple(drawer.written), next_file)
