"""Shared helpers of the validate stage tests (tests/test_validate_*.py): rows, files, configs, accounting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.common.records import LoadResult, load_records, read_jsonl
from tasks.config import FewtuneConfig
from tasks.validate import ValidationResult

REPO = Path(__file__).resolve().parent.parent


def chat(i: int, *, user: str | None = None, answer: str | None = None, system: str | None = None) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [
        {"role": "user", "content": user if user is not None else f"Question number {i}?"},
        {"role": "assistant", "content": answer if answer is not None else f"Answer number {i}."},
    ]
    return {"id": f"r{i}", "messages": messages}


def write_rows(path: Path, rows: list[Any]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load(tmp_path: Path, name: str, rows: list[Any]) -> LoadResult:
    return load_records(write_rows(tmp_path / name, rows))


def from_records(path: str, records: list[dict[str, Any]]) -> LoadResult:
    """Records built in Python, for checks the loader would already catch in a file."""
    return LoadResult(path=path, format="messages", records=[{**r, "line": i} for i, r in enumerate(records, 1)])


def make_cfg(**validate: Any) -> FewtuneConfig:
    cfg = FewtuneConfig(data={"train": "x.jsonl"})
    # Most tests look at single rows in tiny files; the fatal tests set these back.
    cfg.data.max_bad_fraction = 1.0
    cfg.validate_.max_leak_fraction = 1.0
    for key, value in validate.items():
        setattr(cfg.validate_, key, value)
    return cfg


def clean_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [chat(i) for i in range(start, start + n)]


def quarantined_by_line(result: ValidationResult, file: Path | str) -> dict[int, list[str]]:
    return {e["line"]: e["reasons"] for e in result.quarantined if e["file"] == str(file)}


def assert_accounting(result: ValidationResult) -> None:
    for f in result.counts["files"].values():
        assert f["rows_in"] == f["rows_kept"] + f["rows_quarantined"]
    report = json.loads(result.report_path.read_text())
    assert report["files"] == result.counts["files"]
    assert len(read_jsonl(result.quarantine_path)) == len(result.quarantined)
