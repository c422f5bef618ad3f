"""What the validate stage returns and reports: its result, the error that stops a run, one-line summaries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ValidationFailed(ValueError):
    """The data cannot be used for a run. The message names each file, the problem and the fix."""

    def __init__(self, problems: list[str], report_path: Path, quarantine_path: Path):
        self.problems = problems
        self.report_path = report_path
        self.quarantine_path = quarantine_path
        lines = ["the data is not usable:", *problems, f"report: {report_path}", f"quarantined rows: {quarantine_path}"]
        super().__init__("\n".join(lines))


@dataclass
class ValidationResult:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    quarantined: list[dict[str, Any]]
    counts: dict[str, Any]
    train_path: Path
    eval_path: Path
    quarantine_path: Path
    report_path: Path
    warnings_path: Path | None = None
    docs_path: Path | None = None

    def summary(self) -> dict[str, Any]:
        """Summary for the run report: rows per file and split, counts per check, warnings and notes."""
        checks = self.counts["checks"]
        return {
            "train_rows": len(self.train),
            "eval_rows": len(self.eval),
            "eval_source": self.counts["eval_source"],
            "labels": self.counts.get("labels", []),
            "system_prompt": self.counts.get("system_prompt"),
            "files": {
                role: {k: f[k] for k in ("path", "rows_in", "rows_kept", "rows_quarantined")}
                for role, f in self.counts["files"].items()
            },
            "quarantined": len(self.quarantined),
            "failed_checks": {name: c["quarantined"] for name, c in checks.items() if c["quarantined"]},
            "warnings": {name: c["warned"] for name, c in checks.items() if c["warned"]},
            "warned_rows": self.counts["warned_rows"],
            "notes": self.counts["notes"],
            "checks": check_rows(self.counts),
            "docs_path": str(self.docs_path) if self.docs_path else None,
        }


def check_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per check of a validation report (`validation.json`): severity, flagged, quarantined, warned."""
    return [
        {"check": name, **{k: c[k] for k in ("severity", "flagged", "quarantined", "warned")}}
        for name, c in report["checks"].items()
    ]


def summary_line(v: dict[str, Any], details: bool = False) -> str:
    """One line from `ValidationResult.summary()`: rows in, kept and quarantined per file, failed checks; with
    `details`, also the warnings and the Data Docs path (the full counts are in data/validation.json)."""
    files = "; ".join(
        f"{role} {f['rows_in']} rows in, {f['rows_kept']} kept, {f['rows_quarantined']} quarantined"
        for role, f in v["files"].items()
    )
    line = f"{files}; failed checks: {', '.join(f'{k} {n}' for k, n in v['failed_checks'].items()) or 'none'}"
    if details:
        line += f"; warnings: {', '.join(f'{k} {n}' for k, n in v['warnings'].items()) or 'none'}"
        line += f"; Data Docs: {v.get('docs_path')}"
    return line
