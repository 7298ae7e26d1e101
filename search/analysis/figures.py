"""Drawing the report's figures. Each `draw_*` takes data computed in `data.py` / `final.py` (or,
for Optuna's own plots, the study) and returns a matplotlib Figure; `save_png` writes one.

Optuna's matplotlib visualisations draw the optimisation history, parameter importances,
parallel coordinates, slices and the timeline; matplotlib draws what Optuna has no plot for (learning curves with pruned
trials marked, cost to best, accuracy per categorical value, confusion matrix, t-SNE).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from search.analysis.advice import Boundary, Curve, Samples  # noqa: E402
from search.analysis.render import time_unit  # noqa: E402
from search.analysis.tables import (  # noqa: E402
    CategoricalEffect,
    CostToBest,
    Importances,
    LearningCurve,
    SizeFrontier,
)

STATE_COLOURS = {"complete": "tab:blue", "pruned": "tab:orange", "fail": "tab:red",
                 "running": "tab:gray"}
DPI = 110


def save_png(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


def _optuna_plot(name: str, study: optuna.Study, size: tuple[float, float], **kwargs) -> Figure:
    """Calls `optuna.visualization.matplotlib.<name>` and returns the Figure it drew on (its
    plots return one Axes or an array of them). Optuna flags these plots experimental; that
    warning means nothing to a report reader."""
    # rc_context undoes the global style (ggplot) Optuna's plots switch on, so the other
    # figures do not depend on which plot was drawn first.
    with warnings.catch_warnings(), plt.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = getattr(optuna.visualization.matplotlib, name)(study, **kwargs)
    first = axes.flat[0] if isinstance(axes, np.ndarray) else axes
    figure = first.figure
    figure.set_size_inches(*size)
    return figure


# ---------------------------------------------------------------- Optuna's plots

def draw_optimization_history(study: optuna.Study) -> Figure:
    return _optuna_plot("plot_optimization_history", study, (8, 4.5),
                        target_name="validation accuracy")


def draw_parallel_coordinates(study: optuna.Study, params: Sequence[str]) -> Figure:
    return _optuna_plot("plot_parallel_coordinate", study, (max(8, 1.6 * len(params) + 3), 5),
                        params=list(params), target_name="validation accuracy")


def draw_slices(study: optuna.Study, params: Sequence[str]) -> Figure:
    return _optuna_plot("plot_slice", study, (3.6 * len(params) + 1.5, 4),
                        params=list(params), target_name="validation accuracy")


def draw_timeline(study: optuna.Study) -> Figure:
    n = len(study.get_trials(deepcopy=False))
    return _optuna_plot("plot_timeline", study, (9, min(12, 2.5 + 0.18 * n)))


# ---------------------------------------------------------------- matplotlib plots

def draw_learning_curves(curves: Sequence[LearningCurve], epochs: int) -> Figure:
    """Validation accuracy per epoch, coloured by state; a cross marks where a trial was pruned,
    the baseline is drawn thick."""
    figure, axes = plt.subplots(figsize=(8, 4.8))
    for curve in curves:
        colour = STATE_COLOURS.get(curve.state, "tab:gray")
        axes.plot(curve.epochs, curve.val_accuracy, color=colour, alpha=0.9 if curve.baseline else 0.5,
                  linewidth=2.5 if curve.baseline else 1, marker="." if len(curve.epochs) < 3 else None)
        if curve.state == "pruned":
            axes.plot(curve.epochs[-1], curve.val_accuracy[-1], "x", color=colour, markersize=7)
    handles = [plt.Line2D([], [], color=c, label=s) for s, c in STATE_COLOURS.items()
               if any(curve.state == s for curve in curves)]
    handles.append(plt.Line2D([], [], color="tab:orange", marker="x", linestyle="", label="pruned here"))
    if any(curve.baseline for curve in curves):
        handles.append(plt.Line2D([], [], color="gray", linewidth=2.5, label="baseline (thick)"))
    axes.legend(handles=handles, loc="lower right", fontsize="small")
    axes.set(xlabel="epoch", ylabel="validation accuracy", xlim=(0.8, epochs + 0.2),
             title=f"Learning curves of {len(curves)} trials")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    return figure


def draw_importances(study: optuna.Study, importances: Importances, seed: int) -> Figure:
    """Optuna's importance plot (fANOVA, the evaluator `data.param_importances` uses) over the
    parameters that varied, most important on top."""
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    return _optuna_plot("plot_param_importances", study, (7, 0.35 * len(importances.values) + 1.5),
                        evaluator=evaluator, params=list(importances.values),
                        target_name="validation accuracy")


def draw_cost_to_best(cost: CostToBest) -> Figure:
    """Best validation accuracy so far against trials started and against wall time, with the
    band within `tolerance` of the best and the point where the search first entered it."""
    figure, (by_trials, by_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    counts = np.arange(1, len(cost.numbers) + 1)
    best = np.array([math.nan if v is None else v for v in cost.best_so_far])
    scale, unit = time_unit(max(cost.elapsed_seconds))
    elapsed = np.array(cost.elapsed_seconds) / scale
    for axes, x, reached, label in ((by_trials, counts, cost.trials_needed, "trials ended"),
                                    (by_time, elapsed, cost.seconds_needed / scale,
                                     f"wall time since the first trial ({unit})")):
        axes.step(x, best, where="post", color="tab:blue", marker=".")
        axes.axhspan(cost.best - cost.tolerance, cost.best, color="tab:green", alpha=0.15,
                     label=f"within {cost.tolerance:g} of best")
        axes.axvline(reached, color="tab:green", linestyle="--", label="first reached")
        axes.set(xlabel=label)
        axes.set_xlim(left=0)
        axes.grid(alpha=0.3)
    by_trials.xaxis.get_major_locator().set_params(integer=True)
    by_trials.set_ylabel("best validation accuracy so far")
    by_trials.legend(loc="lower right", fontsize="small")
    figure.suptitle(f"Cost to best: {cost.trials_needed} trials and "
                    f"{cost.seconds_needed / scale:.1f} {unit} to get within {cost.tolerance:g} "
                    f"of the best ({cost.best:.4f})")
    return figure


def draw_size_frontier(frontier: SizeFrontier) -> Figure:
    """Every complete trial by size and accuracy; the Pareto front as a step line; the budget."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.scatter(frontier.parameter_counts, frontier.values, s=18, color="tab:blue", alpha=0.6,
                 label="complete trials")
    front = [(c, v) for n, c, v in zip(frontier.numbers, frontier.parameter_counts,
                                       frontier.values) if n in frontier.pareto]
    axes.step([c for c, _ in front], [v for _, v in front], where="post", color="tab:red",
              marker="o", label="Pareto front (no smaller model is better)")
    if frontier.budget is not None:
        axes.axvline(frontier.budget, color="tab:gray", linestyle="--",
                     label=f"max_params = {frontier.budget:,}")
    axes.set_xscale("log")
    axes.set(xlabel="parameters", ylabel="validation accuracy",
             title="Accuracy against model size")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    return figure


def draw_categorical_effects(effects: Sequence[CategoricalEffect]) -> Figure:
    """A box per value (quartiles, from matplotlib) with every trial as a jittered dot."""
    columns = min(3, len(effects))
    rows = math.ceil(len(effects) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False,
                                sharey=True)
    jitter = np.random.default_rng(0)
    for axes, effect in zip(grid.flat, effects):
        labels = [str(c) for c in effect.choices]
        axes.boxplot([list(v) for v in effect.values], tick_labels=labels, widths=0.5,
                     showfliers=False)
        for position, values in enumerate(effect.values, 1):
            x = position + jitter.uniform(-0.12, 0.12, len(values))
            axes.plot(x, values, "o", color="tab:blue", alpha=0.6, markersize=4)
        axes.set_title(effect.param)
        axes.grid(alpha=0.3, axis="y")
    for axes in grid.flat[len(effects):]:
        axes.set_visible(False)
    for axes in grid[:, 0]:
        axes.set_ylabel("validation accuracy")
    figure.suptitle("Validation accuracy of complete trials per value")
    figure.tight_layout()
    return figure


def draw_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """Row-normalised (recall per true class), counts written in when there are few classes."""
    from sklearn.metrics import ConfusionMatrixDisplay

    size = min(14, 3 + 0.5 * len(class_names))
    figure, axes = plt.subplots(figsize=(size, size * 0.85))
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    display = ConfusionMatrixDisplay(normalised, display_labels=list(class_names))
    display.plot(ax=axes, include_values=len(class_names) <= 12, values_format=".2f",
                 cmap="Blues", colorbar=True, xticks_rotation=45 if len(class_names) <= 20 else 90)
    axes.set_title(title)
    return figure


def draw_tsne(points: np.ndarray, labels: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    figure, axes = plt.subplots(figsize=(7, 6))
    colours = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for index, name in enumerate(class_names):
        mask = labels == index
        if mask.any():
            axes.scatter(points[mask, 0], points[mask, 1], s=8, color=colours(index % colours.N),
                         label=name, alpha=0.8)
    if len(class_names) <= 20:
        axes.legend(fontsize="x-small", markerscale=2, loc="best", ncol=1 + len(class_names) // 10)
    axes.set(title=title, xticks=[], yticks=[])
    return figure


def draw_comparison(names: Sequence[str], val: Sequence[float | None],
                    test: Sequence[float | None]) -> Figure:
    """Best validation accuracy (and mean test accuracy where retrained) per study."""
    figure, axes = plt.subplots(figsize=(max(5, 1.6 * len(names) + 2), 4))
    x = np.arange(len(names))
    nan = lambda values: [math.nan if v is None else v for v in values]  # noqa: E731
    axes.bar(x - 0.2, nan(val), width=0.4, label="best validation accuracy")
    if any(v is not None for v in test):
        axes.bar(x + 0.2, nan(test), width=0.4, label="test accuracy (mean over seeds)")
    axes.set_xticks(x, names)
    axes.set(ylabel="accuracy", title="Studies compared")
    axes.legend(fontsize="small", loc="lower right")
    axes.grid(alpha=0.3, axis="y")
    return figure


# ---------------------------------------------------------------- what to do next

def draw_boundaries(boundaries: Sequence[Boundary]) -> Figure:
    """A slice plot per range with a finding: every complete trial's value against its
    validation accuracy, the best trials ringed, failed trials as crosses along the bottom, the
    range's edges shaded, the current bounds as solid lines and the next study's as dashed."""
    columns = min(3, len(boundaries))
    rows = math.ceil(len(boundaries) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    for axes, b in zip(grid.flat, boundaries):
        values = [v for v, _ in b.points]
        accuracy = [a for _, a in b.points]
        axes.plot(values, accuracy, "o", color="tab:blue", alpha=0.6, markersize=4,
                  label="complete trials")
        best = [(v, a) for v, a in b.points if v in b.top]
        axes.plot([v for v, _ in best], [a for _, a in best], "o", markerfacecolor="none",
                  markeredgecolor="tab:green", markersize=9, label=f"best {len(b.top)}")
        if b.failed:
            floor = min(accuracy) if accuracy else 0.0
            axes.plot(b.failed, [floor] * len(b.failed), "x", color="tab:red",
                      label="failed / over budget")
        if b.log:
            axes.set_xscale("log")
            span = math.log(b.high / b.low) if b.high > b.low else 0
            edges = (b.low * math.exp(0.2 * span), b.high * math.exp(-0.2 * span))
        else:
            edges = (b.low + 0.2 * (b.high - b.low), b.high - 0.2 * (b.high - b.low))
        axes.axvspan(b.low, edges[0], color="tab:gray", alpha=0.12)
        axes.axvspan(edges[1], b.high, color="tab:gray", alpha=0.12, label="edges (outer 20%)")
        for bound in (b.low, b.high):
            axes.axvline(bound, color="black", linewidth=1.2)
        moved = [bound for bound, old in zip(b.proposed, (b.low, b.high)) if bound != old]
        for index, bound in enumerate(moved):
            axes.axvline(bound, color="tab:purple", linestyle="--", linewidth=1.5,
                         label="next study's bounds" if index == 0 else None)
        if b.narrowed_by is not None:
            region = b.narrowed_by
            start, end = ((region.start, b.high) if region.side == "high" else (b.low, region.start))
            axes.axvspan(start, end, color="tab:red", alpha=0.12, label="fails here")
        axes.set_title(b.param + (f" ({b.group})" if b.group else "")
                       + (f": {b.side} edge" if b.side else ""), fontsize="medium")
        axes.set_xlabel(b.param)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small", loc="best")
    for axes in grid.flat[len(boundaries):]:
        axes.set_visible(False)
    for axes in grid[:, 0]:
        axes.set_ylabel("validation accuracy")
    figure.tight_layout()
    return figure


def draw_best_curves(curves: Sequence[Curve]) -> Figure:
    """The best trials' validation accuracy (left axis) and training and validation loss (right
    axis) per epoch, each titled with how its curve reads."""
    figure, grid = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 3.6), squeeze=False)
    for axes, curve in zip(grid.flat, curves):
        axes.plot(curve.epochs, curve.val_accuracy, "o-", color="tab:blue",
                  label="validation accuracy")
        axes.set_ylabel("validation accuracy")
        axes.set_xlabel("epoch")
        axes.xaxis.get_major_locator().set_params(integer=True)
        if any(v is not None for v in curve.val_loss):
            loss = axes.twinx()
            nan = lambda values: [math.nan if v is None else v for v in values]  # noqa: E731
            loss.plot(curve.epochs, nan(curve.train_loss), "--", color="tab:orange",
                      label="training loss")
            loss.plot(curve.epochs, nan(curve.val_loss), "--", color="tab:red",
                      label="validation loss")
            loss.set_ylabel("loss")
            loss.legend(fontsize="x-small", loc="upper right")
        axes.set_title(f"trial {curve.number}: {curve.verdict}", fontsize="medium")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small", loc="lower right")
    figure.tight_layout()
    return figure


def draw_progress(cost: CostToBest, samples: Samples) -> Figure:
    """Best validation accuracy so far against trials ended, the last part of the study shaded:
    whether the best was still moving when the study stopped."""
    figure, axes = plt.subplots(figsize=(7, 3.6))
    counts = np.arange(1, len(cost.numbers) + 1)
    best = [math.nan if v is None else v for v in cost.best_so_far]
    axes.step(counts, best, where="post", color="tab:blue", marker=".")
    tail = samples.tail_trials
    if tail:
        axes.axvspan(len(counts) - tail + 0.5, len(counts) + 0.5, color="tab:orange", alpha=0.15,
                     label=f"last {tail} trials: {samples.tail_gain:+.4f}")
        axes.legend(fontsize="small", loc="lower right")
    axes.set(xlabel="trials ended", ylabel="best validation accuracy so far",
             title=f"{samples.complete} complete trials, {samples.dimensions} searched parameters")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    return figure
