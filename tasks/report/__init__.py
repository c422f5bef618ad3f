"""The run report: one self-contained `report.html` per run, and the same summary as Markdown and a table.

The page needs nothing but a browser: CSS is inline and every plot is an inline PNG (matplotlib), so it works offline
and can be mailed or attached to a ticket. It is built from the files of the run folder only (`summary.json`,
`eval_results.json`, `predictions.jsonl`, `train_log.json`), so `fewtune report RUN_DIR` rebuilds it at any time.

Contents: the gate decision and each criterion, task metrics with their intervals, training curves, perplexity
(over-memorization signal) with a per-row histogram, forgetting, memorization, robustness to rephrased prompts,
side-by-side example answers, and links to the Data Docs, the quarantined rows and the MLflow run and model version.

- `page.py` — `report_context`, `render_report`, `write_report` (the HTML page from `templates/report.html`)
- `plots.py` — the plots, each an inline PNG
- `summary.py` — `summary_markdown`, `summary_rows` (Prefect artifacts)
"""

from tasks.report.page import (
    EXAMPLES_IN_REPORT,
    REPORT_FILE,
    TEMPLATE_DIR,
    ReportError,
    mlflow_links,
    render_report,
    report_context,
    write_report,
)
from tasks.report.plots import (
    plot_deltas,
    plot_forgetting,
    plot_memorization,
    plot_perplexity,
    plot_ppl_histogram,
    plot_training,
)
from tasks.report.summary import CRITERIA_LABELS, summary_markdown, summary_rows

__all__ = [
    "CRITERIA_LABELS",
    "EXAMPLES_IN_REPORT",
    "REPORT_FILE",
    "TEMPLATE_DIR",
    "ReportError",
    "mlflow_links",
    "plot_deltas",
    "plot_forgetting",
    "plot_memorization",
    "plot_perplexity",
    "plot_ppl_histogram",
    "plot_training",
    "render_report",
    "report_context",
    "summary_markdown",
    "summary_rows",
    "write_report",
]
