"""Presentation of a health report: plain lines (CLI, notebook), Markdown (Prefect artifact), and
`python -m tasks.health RUN_DIR`."""

from __future__ import annotations

import sys
from typing import Any

from tasks.health.folders import assess_run_dir


def health_lines(report: dict[str, Any]) -> list[str]:
    """The report as plain lines: one summary line, then each flag with what to change."""
    checks = report["checks"]
    if report["healthy"]:
        done = [c for c in checks if c["status"] == "ok"]
        skipped = [c["name"] for c in checks if c["status"] == "skipped"]
        line = f"no warning signs ({len(done)} checks passed" + (f"; not checked: {', '.join(skipped)}" if skipped else "") + ")"
        return [line]
    lines = [f"{len(report['flags'])} warning sign(s): {', '.join(report['flags'])}"]
    for c in checks:
        if c["status"] == "flag":
            lines += [f"  {c['title']}: {c['observed']}", f"    fix: {c['advice']}"]
    return lines


def health_markdown(report: dict[str, Any], run_name: str | None = None) -> str:
    head = f"# Training health of `{run_name}`" if run_name else "# Training health"
    verdict = "**No warning signs.**" if report["healthy"] else f"**{len(report['flags'])} warning sign(s):** {', '.join(report['flags'])}"
    lines = [head, "", verdict, "", "| check | result | observed | threshold | what to change |", "|---|---|---|---|---|"]
    for c in report["checks"]:
        result = {"ok": "ok", "flag": "**FLAG**", "skipped": "not checked"}[c["status"]]
        cells = [c["title"], result, c["observed"], c["threshold"], c["advice"] or "-"]
        lines.append("| " + " | ".join(str(x).replace("|", "/") for x in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.health RUN_DIR`: the health checks of a finished run folder."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m tasks.health RUN_DIR", file=sys.stderr)
        return 2
    report = assess_run_dir(args[0], count_tokens=True).to_dict()
    print("\n".join(health_lines(report)))
    return 0 if report["healthy"] else 1
