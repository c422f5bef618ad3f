"""The run's outcome for Prefect artifacts: a Markdown summary and a table of metrics."""

from __future__ import annotations

from typing import Any

CRITERIA_LABELS = {
    "task_gain": "Task gain (primary metric)",
    "forgetting_ppl": "Forgetting: general-text perplexity rise",
    "forgetting_kl_general": "Forgetting: KL(base || tuned) on general prompts",
    "forgetting_kl_task": "Forgetting: KL(base || tuned) on task prompts",
    "forgetting_flips": "Forgetting: general questions right -> wrong",
    "memorization": "Memorization excess",
    "beat_baselines": "Beats the best baseline (zero-shot, k-shot, TF-IDF + LR)",
    "champion": "Beats the current champion",
    "forgetting": "Forgetting (probe perplexity rise)",  # run folders from before the forgetting signals
}
# How each criterion status is shown (the gate's statuses; `tasks.register.gate.STATUS_LABELS` holds the same).
STATUS_LABELS = {"pass": "pass", "fail": "FAIL", "insufficient": "insufficient", "not_applicable": "n/a", "off": "off",
                 "error": "ERROR"}
STATUS_CLASS = {"pass": "ok", "fail": "bad", "error": "bad", "insufficient": "warn", "not_applicable": "muted", "off": "muted"}


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "–" if value is None else str(value)


def _cell(text: str) -> str:
    """Text inside a Markdown table cell (a bare `|` would end the cell)."""
    return text.replace("|", "\\|")


def criterion_status(c: dict[str, Any]) -> str:
    """A recorded criterion's status (criteria recorded before statuses existed had only `passed`)."""
    return c.get("status") or ("pass" if c.get("passed") else "fail")


def criterion_cells(c: dict[str, Any]) -> dict[str, str]:
    """A recorded gate criterion as shown everywhere (CLI, report, Prefect summary): label, status, value with its
    interval, threshold with the side of it that passes, rows that would decide an insufficient one, detail."""
    status = criterion_status(c)
    value = c.get("value")
    shown = "–" if value is None else f"{value:+.4g}"
    if c.get("low") is not None and c.get("high") is not None:
        shown += f" [{c['low']:+.4g}, {c['high']:+.4g}]"
    threshold = c.get("threshold")
    side = {"higher_is_better": "> ", "lower_is_better": "<= "}.get(c.get("direction") or "", "")
    return {
        "name": c["name"],
        "label": CRITERIA_LABELS.get(c["name"], c["name"]),
        "status": status,
        "status_text": STATUS_LABELS.get(status, status),
        "status_class": STATUS_CLASS.get(status, "bad"),
        "value_text": shown,
        "threshold_text": "–" if threshold is None else f"{side}{threshold:+.4g}",
        "rows_needed_text": f"about {c['rows_needed']} {c.get('rows') or 'rows'}" if c.get("rows_needed") else "",
        "detail": c.get("detail", ""),
    }


def summary_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric: baseline, tuned, delta and its interval."""
    rows = []
    for name, iv in evaluation.get("intervals", {}).items():
        rows.append(
            {
                "metric": f"{name} (gate)" if name == evaluation["primary_metric"] else name,
                "baseline": iv["baseline"],
                "tuned": iv["tuned"],
                "delta": iv["delta"],
                "ci_low": iv["low"],
                "ci_high": iv["high"],
            }
        )
    return rows


def summary_markdown(summary: dict[str, Any], evaluation: dict[str, Any], report_path: str | None = None) -> str:
    """The run's outcome as Markdown: decision, gate criteria, metrics with intervals, where things are."""
    reg = summary.get("register") or {}
    gate = reg.get("gate") or summary.get("gate") or {}
    conf = f"{evaluation.get('bootstrap', {}).get('confidence', 0.95) * 100:.0f}%"
    lines = [f"# fewtune run `{summary['run_name']}`", ""]
    decision = reg.get("decision") or gate.get("decision") or "no promotion decision (registration disabled)"
    lines += [f"**Gate:** {decision}", ""]
    table = evaluation.get("baselines")
    if table and table.get("systems"):
        metric = table["primary_metric"]
        lines += [f"**Is fine-tuning worth it here?** {evaluation.get('worth_it') or '–'}", "",
                  f"| system | accuracy | macro-F1 | tuned − it ({metric}) | {conf} CI |", "|---|---|---|---|---|"]
        for name, b in table["systems"].items():
            d = b["tuned_minus"]
            best = " (best baseline)" if name == table.get("best") else ""
            lines.append(f"| {_cell(name + best)} | {_fmt(b['metrics'].get('accuracy'))} | {_fmt(b['metrics'].get('macro_f1'))} | "
                         f"{d['delta']:+.4f} | {d['low']:+.4f} to {d['high']:+.4f} |")
        tuned = evaluation.get("tuned") or {}
        lines += [f"| fine-tuned model | {_fmt(tuned.get('accuracy'))} | {_fmt(tuned.get('macro_f1'))} | | |", ""]
    if gate.get("criteria"):
        lines += ["| criterion | status | value [interval] | threshold | rows that would decide it | detail |",
                  "|---|---|---|---|---|---|"]
        for c in map(criterion_cells, gate["criteria"]):
            status = c["status_text"] if c["status"] in ("pass", "not_applicable", "off") else f"**{c['status_text']}**"
            lines.append(
                f"| {_cell(c['label'])} | {status} | {c['value_text']} | {c['threshold_text']} | {c['rows_needed_text'] or '–'} | "
                f"{_cell(c['detail'])} |"
            )
        lines.append("")
    lines += [f"| metric | baseline | tuned | delta | {conf} CI |", "|---|---|---|---|---|"]
    for r in summary_rows(evaluation):
        lines.append(f"| {r['metric']} | {r['baseline']:.4f} | {r['tuned']:.4f} | {r['delta']:+.4f} | {r['ci_low']:+.4f} to {r['ci_high']:+.4f} |")
    lines.append("")
    if reg:
        lines.append(f"**Registry:** {reg['model_name']} version {reg['version']} ({', '.join(reg['aliases'])}) at `{reg['tracking_uri']}`")
    lines.append(f"**Run folder:** `{summary['run_dir']}`" + (f" — report: `{report_path}`" if report_path else ""))
    return "\n".join(lines) + "\n"
