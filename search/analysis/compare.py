"""Several studies side by side (`study=cnn3,resnet20`): best validation and test accuracy,
size and time of each study's best configuration, in `<out>/compare_<a>_<b>/`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from search.analysis import figures
from search.analysis.compose import StudyReport
from search.analysis.render import (
    Block,
    Heading,
    Image,
    Table,
    Text,
    to_html,
    to_markdown,
)
from search.storage.trials import TrialAttr


def comparison_table(reports: Sequence[StudyReport]) -> pd.DataFrame:
    rows = []
    for report in reports:
        best, summary = report.best, report.summary
        rank1 = report.evaluation.results[0] if report.evaluation else None
        baseline = next((r for r in report.evaluation.results if "baseline" in r.label),
                        None) if report.evaluation else None
        rows.append({
            "study": summary.study_name,
            "model": summary.model,
            "dataset": summary.dataset,
            "complete": summary.counts.get("complete", 0),
            "pruned": summary.counts.get("pruned", 0),
            "failed": summary.counts.get("fail", 0),
            "best trial": summary.best_trial,
            "best_val_accuracy": summary.best_value,
            "test_accuracy_mean": rank1.mean if rank1 else None,
            "test_accuracy_std": rank1.std if rank1 else None,
            "baseline test_accuracy_mean": baseline.mean if baseline else None,
            "parameter_count": best.user_attrs.get(TrialAttr.PARAMETER_COUNT) if best else None,
            "best trial train_seconds": best.user_attrs.get(TrialAttr.TRAIN_SECONDS) if best else None,
            "search wall_seconds": round(summary.wall_seconds, 1),
            "report": f"../{report.folder.name}/report.md",
        })
    return pd.DataFrame(rows)


def write_comparison(reports: Sequence[StudyReport], out: Path) -> Path:
    """Writes the comparison folder; returns its report.md."""
    names = [r.summary.study_name for r in reports]
    folder = out / ("compare_" + "_".join(names))
    folder.mkdir(parents=True, exist_ok=True)
    table = comparison_table(reports)
    table.to_csv(folder / "comparison.csv", index=False)
    figures.save_png(figures.draw_comparison(names, table["best_val_accuracy"].tolist(),
                                             table["test_accuracy_mean"].tolist()),
                     folder / "comparison.png")
    blocks: list[Block] = [
        Heading("Studies compared: " + ", ".join(f"`{n}`" for n in names), 1),
        Text("Best configuration of each study: validation accuracy from the search; test "
             "accuracy (mean over seeds of the rank-1 configuration retrained on train + "
             "validation) where the report was run with `retrain=topN`. Each study's own report "
             "is in its folder next to this one."),
        Table(table),
        Image("comparison.png", "Best validation accuracy and mean test accuracy per study"),
    ]
    (folder / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    (folder / "report.html").write_text(to_html(blocks, "Studies compared", folder), encoding="utf-8")
    return folder / "report.md"
