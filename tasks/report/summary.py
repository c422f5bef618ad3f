"""The run's outcome for Prefect artifacts: a Markdown summary and a table of metrics."""

from __future__ import annotations

from typing import Any

CRITERIA_LABELS = {
    "task_gain": "Task gain (interval lower end)",
    "forgetting": "Forgetting (probe perplexity rise)",
    "memorization": "Memorization excess",
    "champion": "Beats the current champion",
}



def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "–" if value is None else str(value)


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
    if gate.get("criteria"):
        lines += ["| criterion | passed | value | threshold | detail |", "|---|---|---|---|---|"]
        for c in gate["criteria"]:
            lines.append(
                f"| {CRITERIA_LABELS.get(c['name'], c['name'])} | {'yes' if c['passed'] else '**no**'} | {_fmt(c.get('value'))} | "
                f"{_fmt(c.get('threshold'))} | {c['detail'].replace('|', '/')} |"
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
