"""The score stage's report files: the answer log-perplexity histogram and the Markdown summary."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.config import ScoreConfig


def plot_histogram(rows: list[dict[str, Any]], cfg: "ScoreConfig", path: Path) -> Path | None:
    """Histogram of the rows' answer log-perplexity, outliers in their own colour, the outlier cut-off marked."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    values = [float(r["nll_mean"]) for r in rows]
    inliers = [v for v, r in zip(values, rows) if not r["outlier"]]
    outliers = [v for v, r in zip(values, rows) if r["outlier"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = max(1, min(cfg.histogram_bins, len(values)))
    edges = [min(values) + (max(values) - min(values)) * i / bins for i in range(bins + 1)] if max(values) > min(values) else bins
    ax.hist(inliers, bins=edges, color="#4c72b0", label=f"rows ({len(inliers)})")
    if outliers:
        ax.hist(outliers, bins=edges, color="#c44e52", label=f"outliers ({len(outliers)})")
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values)
    if mad > 0:
        ax.axvline(median + cfg.outlier_z * 1.4826 * mad, color="#c44e52", linestyle="--", linewidth=1,
                   label=f"robust z = {cfg.outlier_z:g}")
    ax.set_xlabel("answer log-perplexity under the base model (mean NLL per token, nats)")
    ax.set_ylabel("rows")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cell(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_markdown(
    summary: dict[str, Any], outliers: list[dict[str, Any]], cfg: "ScoreConfig", path: Path, histogram: Path | None
) -> Path:
    m = summary["token_masking"]
    lines = [
        "# Scores under the base model",
        "",
        f"- rows: {summary['rows']}; answer perplexity {summary['response_ppl']} (median row {summary['median_row_ppl']}), "
        f"full-sequence perplexity {summary['sequence_ppl']}",
        f"- outliers (robust z of answer log-perplexity > {cfg.outlier_z:g}): {summary['outliers']} — {summary['note']}",
    ]
    if m["enabled"]:
        lines.append(
            f"- token masking (STM): {m['masked_tokens']} of {m['answer_tokens']} answer tokens masked "
            f"({100 * m['masked_fraction']:.1f}%), token perplexity > {m['threshold']:g}; per row mean "
            f"{100 * m['row_fraction_mean']:.1f}%, max {100 * m['row_fraction_max']:.1f}%; "
            f"{m['rows_capped']} rows capped at {100 * m['max_masked_fraction']:.0f}% by the guard"
        )
    else:
        lines.append("- token masking (STM): off (score.token_masking.enabled=false)")
    if histogram:
        lines += ["", f"![answer log-perplexity histogram]({histogram.name})"]
    if outliers:
        lines += ["", "| id | line | answer ppl | z | action | prompt | answer |", "|---|---|---|---|---|---|---|"]
        for o in outliers[: cfg.outliers_listed]:
            lines.append(
                f"| {_cell(o['id'], 40)} | {o['line'] if o['line'] is not None else ''} | {o['ppl']:.1f} | "
                f"{o['log_ppl_z']:.1f} | {o['action']} | {_cell(o['prompt'])} | {_cell(o['answer'])} |"
            )
        if len(outliers) > cfg.outliers_listed:
            lines.append(f"\n{len(outliers) - cfg.outliers_listed} more in outliers.json.")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
