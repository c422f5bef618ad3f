"""Running check suites over record tables: quarantine row errors with their reasons, note warnings, count per
check; and writing kept rows and the loader's rejects."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pandas as pd

from data_checks import checks as C
from data_checks.checks import Check, Severity
from data_checks.suite import SuiteOutcome, run_suite
from tasks.common.records import LoadResult
from tasks.config import FewtuneConfig
from tasks.validate.tokens import Records, token_columns

LOAD_CHECK = "load"  # reason name of rows the loader could not read or normalise
LOAD_DESCRIPTION = "the loader can read and normalise the row"


@dataclass
class RecordTable:
    """Records and their check table (`data_checks.checks.records_frame`), row i of the one for record i."""

    records: Records
    frame: pd.DataFrame

    def keep(self, positions: list[int]) -> RecordTable:
        if len(positions) == len(self.records):
            return self
        return RecordTable([self.records[p] for p in positions], C.subset(self.frame, positions))

    def rows_at(self, positions: list[int]) -> dict[int, dict[str, Any]]:
        """Table rows as dicts, for the explanations of flagged rows (fetched in one go: fast)."""
        return dict(zip(positions, self.frame.iloc[positions].to_dict("records"))) if positions else {}


@dataclass
class ValidationRun:
    """State of one validation: the GX context, quarantine and warnings per split, counters per check."""

    cfg: FewtuneConfig
    context: Any
    tokenizer: Any
    quarantine: dict[str, Records] = field(default_factory=lambda: defaultdict(list))
    warnings: dict[int, dict[str, Any]] = field(default_factory=dict)  # id(record) -> warnings entry
    suites: list[SuiteOutcome] = field(default_factory=list)
    flagged: Counter = field(default_factory=Counter)
    quarantined: Counter = field(default_factory=Counter)
    descriptions: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # name -> severity, text, suite
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    dataset_warnings: list[str] = field(default_factory=list)
    dataset_warned: Counter = field(default_factory=Counter)
    timings: dict[str, float] = field(default_factory=dict)
    _clock: float = field(default_factory=time.perf_counter)

    def lap(self, phase: str) -> None:
        """Record the seconds since the previous lap under `phase` (reported in validation.json)."""
        now = time.perf_counter()
        self.timings[phase] = round(self.timings.get(phase, 0.0) + now - self._clock, 3)
        self._clock = now

    def run(self, suite: str, frame: pd.DataFrame, checks: list[Check]) -> SuiteOutcome:
        outcome = run_suite(self.context, suite, frame, checks)
        self.suites.append(outcome)
        for check in checks:
            self.descriptions.setdefault(check.name, (check.severity.value, check.description, suite))
            self.flagged[check.name] += len(outcome.checks[check.name].flagged)
        return outcome

    def check_records(self, suite: str, table: RecordTable, split: str, loaded: LoadResult, checks: list[Check]) -> RecordTable:
        """Run per-record `checks` on `table`; quarantine row errors, note warnings, return the kept rows."""
        outcome = self.run(suite, table.frame, checks)
        records = table.records
        rows = table.rows_at(sorted({p for c in outcome.checks.values() for p in c.flagged}))
        reasons: dict[int, list[str]] = defaultdict(list)

        for check in checks:
            if check.keep_first or check.severity is not Severity.ROW_ERROR:
                continue
            for pos in outcome.checks[check.name].flagged:
                reasons[pos].append(f"{check.name}: {check.explain(rows[pos], records[pos])}")
                self.quarantined[check.name] += 1

        # Uniqueness checks flag every copy. The first copy not already quarantined by another check is kept and
        # the copies after it are quarantined (copies before it already are, for their own reasons).
        for check in checks:
            if not check.keep_first:
                continue
            groups: dict[Any, list[int]] = defaultdict(list)
            for pos in outcome.checks[check.name].flagged:
                groups[rows[pos][check.columns[0]]].append(pos)
            for positions in groups.values():
                usable = [p for p in positions if p not in reasons]
                kept = usable[0] if usable else positions[0]
                for pos in positions:
                    if pos <= kept:
                        continue
                    note = C.duplicate_note(rows[pos], rows[kept], kept_is_usable=bool(usable))
                    reasons[pos].append(f"{check.name}: {check.explain(rows[pos], records[pos])}; {note}")
                    self.quarantined[check.name] += 1

        for check in checks:
            if check.severity is not Severity.WARNING:
                continue
            for pos in outcome.checks[check.name].flagged:
                if pos in reasons:
                    continue
                record = records[pos]
                entry = self.warnings.setdefault(
                    id(record),
                    {"file": loaded.path, "line": record.get("line"), "split": split, "id": record.get("id"),
                     "warnings": []},
                )
                entry["warnings"].append(f"{check.name}: {check.explain(rows[pos], record)}")

        self.quarantine[split].extend(
            {"file": loaded.path, "line": records[pos].get("line"), "split": split, "id": records[pos].get("id"),
             "reasons": reasons[pos], "row": records[pos]}
            for pos in sorted(reasons)
        )
        return table.keep([pos for pos in range(len(records)) if pos not in reasons])

    def check_table(self, suite: str, frame: pd.DataFrame, checks: list[Check]) -> None:
        """Run dataset-level `checks`: fatal failures become problems, warnings become dataset warnings."""
        outcome = self.run(suite, frame, checks)
        for check in checks:
            for pos in outcome.checks[check.name].flagged:
                message = check.explain(frame.iloc[pos].to_dict(), None)
                if check.severity is Severity.FATAL:
                    self.problems.append(message)
                else:
                    self.dataset_warnings.append(f"{check.name}: {message}")
                    self.dataset_warned[check.name] += 1

    def row_table(self, records: Records, split: str) -> RecordTable:
        frame = C.records_frame(records, split)
        if self.tokenizer is not None:
            tokens, starts = token_columns(records, self.tokenizer, self.cfg.model.max_length)
            frame["tokens"] = pd.array(tokens, dtype="Int64")
            frame["answer_start_token"] = pd.array(starts, dtype="Int64")
        return RecordTable(records, frame)


def write_rows(path: Path, rows: Records) -> Path:
    """JSON Lines of kept records, like `tasks.common.records.write_jsonl` but with orjson (several times faster on large
    sets); a row orjson cannot encode (e.g. an integer beyond 64 bits) is written by the standard library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for row in rows:
            try:
                f.write(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
            except TypeError:
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


def _printable_id(value: Any) -> str:
    """An id as text that can be written as UTF-8 (unpaired surrogates escaped), at most 200 characters."""
    text = value if isinstance(value, str) else repr(value)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:200]


def reject_entries(loaded: LoadResult, split: str) -> Records:
    """Quarantine entries of the rows the loader could not read or normalise (reason `load: ...`)."""
    entries = []
    for reject in loaded.rejects:
        entry = reject.to_dict()
        raw_id = reject.raw.get("id") if isinstance(reject.raw, dict) else None
        entries.append(
            {"file": entry["file"], "line": entry["line"], "split": split,
             "id": None if raw_id is None else _printable_id(raw_id),
             "reasons": [f"{LOAD_CHECK}: {r}" for r in entry["reasons"]], "row": entry["row"]}
        )
    return entries


def top_reasons(entries: Records, n: int = 3) -> str:
    """The most frequent check names among quarantine entries, e.g. `role_order (3), load (1)`."""
    names = Counter(reason.split(":", 1)[0] for e in entries for reason in e["reasons"])
    return ", ".join(f"{name} ({count})" for name, count in names.most_common(n))
