"""Validate stage: run the data checks, quarantine failing rows with their reasons, and stop on unusable data.

Input: the `LoadResult` of the training file and, when given, of the eval file. Output, under `out_dir`:

- `train.jsonl`, `eval.jsonl`: the kept canonical records (the eval split is made here, before any augmentation,
  when no eval file is given: `data.eval_fraction` of the kept training rows, by a seeded hash of the row ids);
- `quarantine.jsonl`: one line per rejected row, `{"file", "line", "split", "id", "reasons", "row"}`: rows the
  loader could not read, and rows that failed a check (each reason is `check_name: explanation and fix`);
- `validation.json`: rows in / kept / quarantined per file, counts per check and the Great Expectations results.

The checks (see `data_checks/checks.py`) run in two Great Expectations suites: the row checks on each file, then
the leakage check of the training rows against the kept eval rows. A training row that repeats an eval row's
prompt and answer leaves train, never eval: the eval set stays the set the user gave.

Every input row ends up either kept or quarantined (checked on every run). The stage raises `ValidationFailed`
after writing its outputs when too few rows are usable or too many were quarantined.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from data_checks.checks import Check, duplicate_note, leakage_checks, records_frame, row_checks
from data_checks.suite import SuiteOutcome, new_context, run_suite
from flows.config import FewtuneConfig
from tasks.data import LoadResult, split_train_eval, write_jsonl

log = logging.getLogger("fewtune.validate")

Records = list[dict[str, Any]]

LOAD_CHECK = "load"  # reason name of rows the loader could not read or normalise


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

    def summary(self) -> dict[str, Any]:
        """Small summary for the run report: rows per file and split, and how often each check quarantined."""
        return {
            "train_rows": len(self.train),
            "eval_rows": len(self.eval),
            "eval_source": self.counts["eval_source"],
            "files": {
                role: {k: f[k] for k in ("path", "rows_in", "rows_kept", "rows_quarantined")}
                for role, f in self.counts["files"].items()
            },
            "quarantined": len(self.quarantined),
            "failed_checks": {name: c["quarantined"] for name, c in self.counts["checks"].items() if c["quarantined"]},
        }


@dataclass
class _Checked:
    """Result of running checks over one list of records."""

    kept: list[dict[str, Any]]
    quarantined: list[dict[str, Any]]
    outcome: SuiteOutcome
    quarantined_by: Counter = field(default_factory=Counter)


def _check_records(
    context: Any, suite_name: str, records: list[dict[str, Any]], split: str, file: str, checks: list[Check]
) -> _Checked:
    """Run `checks` over `records`; rows flagged by Great Expectations are quarantined with their reasons."""
    frame = records_frame(records, split)
    outcome = run_suite(context, suite_name, frame, checks)
    row = lru_cache(maxsize=None)(lambda pos: frame.iloc[pos].to_dict())  # table row of a flagged record
    reasons: dict[int, list[str]] = defaultdict(list)
    quarantined_by: Counter = Counter()

    for check in checks:
        if check.keep_first:
            continue
        for pos in outcome.checks[check.name].flagged:
            reasons[pos].append(f"{check.name}: {check.explain(row(pos))}")
            quarantined_by[check.name] += 1

    # Uniqueness checks flag every copy. The first copy not already quarantined by another check is kept and
    # the copies after it are quarantined (copies before it already are, for their own reasons).
    for check in checks:
        if not check.keep_first:
            continue
        groups: dict[Any, list[int]] = defaultdict(list)
        for pos in outcome.checks[check.name].flagged:
            groups[row(pos)[check.expectation.column]].append(pos)
        for positions in groups.values():
            usable = [p for p in positions if p not in reasons]
            kept = usable[0] if usable else positions[0]
            for pos in positions:
                if pos <= kept:
                    continue
                note = duplicate_note(row(pos), row(kept), kept_is_usable=bool(usable))
                reasons[pos].append(f"{check.name}: {check.explain(row(pos))}; {note}")
                quarantined_by[check.name] += 1

    kept_records = [r for pos, r in enumerate(records) if pos not in reasons]
    entries = [
        {"file": file, "line": records[pos].get("line"), "split": split, "id": records[pos].get("id"),
         "reasons": reasons[pos], "row": records[pos]}
        for pos in sorted(reasons)
    ]
    return _Checked(kept_records, entries, outcome, quarantined_by)


def _reject_entries(loaded: LoadResult, split: str) -> list[dict[str, Any]]:
    entries = []
    for reject in loaded.rejects:
        entry = reject.to_dict()
        raw_id = reject.raw.get("id") if isinstance(reject.raw, dict) else None
        entries.append(
            {"file": entry["file"], "line": entry["line"], "split": split,
             "id": None if raw_id is None else str(raw_id),
             "reasons": [f"{LOAD_CHECK}: {r}" for r in entry["reasons"]], "row": entry["row"]}
        )
    return entries


def _top_reasons(entries: list[dict[str, Any]], n: int = 3) -> str:
    names = Counter(reason.split(":", 1)[0] for e in entries for reason in e["reasons"])
    return ", ".join(f"{name} ({count})" for name, count in names.most_common(n))


def validate_dataset(
    train: LoadResult, eval: LoadResult | None, cfg: FewtuneConfig, out_dir: Path
) -> ValidationResult:
    """Check, split and quarantine; write the kept rows, the quarantine and the report under `out_dir`."""
    out_dir = Path(out_dir)
    context = new_context()
    checks = row_checks(cfg.validate_.max_chars)
    quarantine: dict[str, list[dict[str, Any]]] = {"train": _reject_entries(train, "train")}
    suites: list[SuiteOutcome] = []
    quarantined_by: Counter = Counter({LOAD_CHECK: len(train.rejects)})
    flagged_by: Counter = Counter({LOAD_CHECK: len(train.rejects)})

    def run(suite: str, records: Records, role: str, loaded: LoadResult, with_checks: list[Check]) -> Records:
        """Check `records` (rows of `loaded`, in split `role`); quarantine failures, return the kept rows."""
        checked = _check_records(context, suite, records, role, loaded.path, with_checks)
        quarantine[role].extend(checked.quarantined)
        suites.append(checked.outcome)
        quarantined_by.update(checked.quarantined_by)
        flagged_by.update({name: len(c.flagged) for name, c in checked.outcome.checks.items()})
        return checked.kept

    # 1. Row checks, file by file.
    train_kept = run("rows-train", train.records, "train", train, checks)
    if eval is not None:
        quarantine["eval"] = _reject_entries(eval, "eval")
        quarantined_by[LOAD_CHECK] += len(eval.rejects)
        flagged_by[LOAD_CHECK] += len(eval.rejects)
        eval_rows = run("rows-eval", eval.records, "eval", eval, checks)
        train_rows = train_kept
    else:
        # 2. Held-out split of the clean rows, before any augmentation.
        train_rows, eval_rows = split_train_eval(train_kept, cfg.data.eval_fraction, cfg.data.split_seed)

    # 3. Leakage: training rows that repeat a kept eval row leave train.
    leak_checks = leakage_checks(records_frame(eval_rows, "eval"))
    train_rows = run("leakage", train_rows, "train", train, leak_checks)

    # Accounting: every input row is either kept or quarantined.
    files: dict[str, dict[str, Any]] = {}
    inputs = {"train": train} if eval is None else {"train": train, "eval": eval}
    for role, loaded in inputs.items():
        kept_train = len(train_rows) if role == "train" else 0
        kept_eval = len(eval_rows) if (role == "eval" or eval is None) else 0
        files[role] = {
            "path": loaded.path,
            "rows_in": loaded.rows_in,
            "rows_kept": kept_train + kept_eval,
            "rows_quarantined": len(quarantine[role]),
            "kept_as_train": kept_train,
            "kept_as_eval": kept_eval,
        }
        f = files[role]
        if f["rows_in"] != f["rows_kept"] + f["rows_quarantined"]:
            raise RuntimeError(
                f"{loaded.path}: {f['rows_in']} rows read but {f['rows_kept']} kept + {f['rows_quarantined']} "
                "quarantined; this is a bug in the validate stage, please report it with the data file"
            )

    quarantine_path = out_dir / "quarantine.jsonl"
    report_path = out_dir / "validation.json"
    problems = _fatal_problems(files, quarantine, train_rows, eval_rows, eval is None, cfg, quarantine_path)

    all_entries = [e for role in quarantine for e in sorted(quarantine[role], key=lambda e: e["line"] or 0)]
    descriptions = {LOAD_CHECK: "the loader can read and normalise the row"}
    descriptions.update({c.name: c.description for c in [*checks, *leak_checks]})
    counts: dict[str, Any] = {
        "usable": not problems,
        "problems": problems,
        "eval_source": "split" if eval is None else "file",
        "files": files,
        "splits": {"train": len(train_rows), "eval": len(eval_rows)},
        "checks": {
            name: {"description": text, "flagged": flagged_by[name], "quarantined": quarantined_by[name]}
            for name, text in descriptions.items()
        },
        "great_expectations": {"success": all(s.success for s in suites), "suites": [s.to_dict() for s in suites]},
        "settings": {
            "max_chars": cfg.validate_.max_chars,
            "min_rows": cfg.validate_.min_rows,
            "min_eval_rows": cfg.validate_.min_eval_rows,
            "max_bad_fraction": cfg.data.max_bad_fraction,
            "eval_fraction": cfg.data.eval_fraction,
            "split_seed": cfg.data.split_seed,
        },
    }

    result = ValidationResult(
        train=train_rows,
        eval=eval_rows,
        quarantined=all_entries,
        counts=counts,
        train_path=write_jsonl(out_dir / "train.jsonl", train_rows),
        eval_path=write_jsonl(out_dir / "eval.jsonl", eval_rows),
        quarantine_path=write_jsonl(quarantine_path, all_entries),
        report_path=report_path,
    )
    report_path.write_text(json.dumps(counts, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    log.info(
        "validated: %d train rows, %d eval rows kept; %d quarantined (%s)",
        len(train_rows), len(eval_rows), len(all_entries), quarantine_path,
    )
    if problems:
        raise ValidationFailed(problems, report_path, quarantine_path)
    return result


def _fatal_problems(
    files: dict[str, dict[str, Any]],
    quarantine: dict[str, list[dict[str, Any]]],
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    eval_is_split: bool,
    cfg: FewtuneConfig,
    quarantine_path: Path,
) -> list[str]:
    """Conditions under which the run must stop, each as `file: problem` plus a `fix:` line."""
    problems = []
    train_file = files["train"]
    quarantined_note = f"{train_file['rows_in']} read, {train_file['rows_quarantined']} quarantined"
    if eval_is_split:
        quarantined_note += f", {len(eval_rows)} held out for eval"
    if len(train_rows) < cfg.validate_.min_rows:
        problems.append(
            f"{train_file['path']}: {len(train_rows)} usable training rows, fewer than validate.min_rows="
            f"{cfg.validate_.min_rows} ({quarantined_note})\n"
            f"  fix: add training rows or correct the quarantined ones (see {quarantine_path}), "
            "or lower validate.min_rows"
        )
    if len(eval_rows) < cfg.validate_.min_eval_rows:
        if eval_is_split:
            problems.append(
                f"{train_file['path']}: the held-out split has {len(eval_rows)} eval rows (data.eval_fraction="
                f"{cfg.data.eval_fraction} of {train_file['rows_kept']} usable rows), fewer than "
                f"validate.min_eval_rows={cfg.validate_.min_eval_rows}\n"
                "  fix: give an eval file as data.eval, raise data.eval_fraction, or add training rows"
            )
        else:
            eval_file = files["eval"]
            problems.append(
                f"{eval_file['path']}: {len(eval_rows)} usable eval rows, fewer than validate.min_eval_rows="
                f"{cfg.validate_.min_eval_rows} ({eval_file['rows_in']} read, {eval_file['rows_quarantined']} "
                f"quarantined)\n  fix: add eval rows or correct the quarantined ones (see {quarantine_path}), "
                "or lower validate.min_eval_rows"
            )
    for role, f in files.items():
        share = f["rows_quarantined"] / f["rows_in"] if f["rows_in"] else 0.0
        if share > cfg.data.max_bad_fraction:
            problems.append(
                f"{f['path']}: {f['rows_quarantined']} of {f['rows_in']} rows ({share:.0%}) are quarantined, above "
                f"data.max_bad_fraction={cfg.data.max_bad_fraction}; most frequent: {_top_reasons(quarantine[role])}\n"
                f"  fix: correct the rows listed in {quarantine_path} (each names its line and reason), "
                "or raise data.max_bad_fraction"
            )
    return problems
