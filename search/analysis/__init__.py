"""The report generator: `python -m search.report study=cnn3` summarises a study.

Data apart from drawing: `data` computes tables and curves from a study (pandas frames and
NamedTuples), `figures` draws them, `final_tables` presents the final evaluation on the test set (the
retraining itself is `search.runner.final_models`'s), `render` writes Markdown and self-contained HTML,
`advice` reads what to do next (ranges at an edge, failing regions, choices, curves, samples) and
`next_study` writes it as the next study file, `compose` puts one study's report together,
`compare` sets several studies side by side.
Nothing outside this package imports it.

Example:
    >>> from search.analysis import ReportOptions, open_source, write_report
    >>> source = open_source({"study": "cnn3"})  # doctest: +SKIP
    >>> report = write_report(source, ReportOptions(top_k=5, retrain=0))  # doctest: +SKIP
    >>> report.markdown  # doctest: +SKIP
    PosixPath('reports/cnn3/report.md')
"""

from search.analysis.compare import comparison_table, write_comparison
from search.analysis.compose import ReportOptions, StudyReport, write_report
from search.storage.reading import StudySource, open_source

__all__ = [
    "ReportOptions",
    "StudyReport",
    "StudySource",
    "comparison_table",
    "open_source",
    "write_comparison",
    "write_report",
]
