"""The building blocks of the data checks: a check's severity, the `Check` itself, and how a table row is named in
messages. See `data_checks/checks.py` for the checks and the tables they run on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import great_expectations.expectations as gxe

# Column that identifies a table row in Great Expectations results (ids can repeat or be missing).
POSITION = "position"
SEP = "\x1f"  # joins the parts of a key; never part of accepted text (a control character)


class Severity(str, Enum):
    FATAL = "fatal"
    ROW_ERROR = "row error"
    WARNING = "warning"

    @property
    def gx(self) -> str:
        """Great Expectations' severity level shown in Data Docs: critical, warning or info."""
        return {"fatal": "critical", "row error": "warning", "warning": "info"}[self.value]


Explain = Callable[[dict[str, Any], dict[str, Any] | None], str]


@dataclass(frozen=True)
class Check:
    """One named check: the expectation that finds failing table rows and the explanation of each of them.

    `explain(row, record)` gets the failing table row as a dict and, for per-record tables, the record itself.
    """

    name: str
    severity: Severity
    description: str
    expectation: gxe.Expectation
    explain: Explain
    keep_first: bool = False

    @property
    def columns(self) -> list[str]:
        names = (getattr(self.expectation, key, None) for key in ("column", "column_A", "column_B"))
        return [c for c in names if c]


def where(row: dict[str, Any]) -> str:
    line = row.get("line")
    return f"line {line} (id {row.get('id')})" if line is not None and line == line else f"id {row.get('id')}"


def duplicate_note(row: dict[str, Any], kept: dict[str, Any], kept_is_usable: bool) -> str:
    """Tail of a uniqueness reason: the earlier copy that this row repeats."""
    if kept_is_usable:
        return f"kept copy: {where(kept)}"
    return f"first copy: {where(kept)}, quarantined too"
