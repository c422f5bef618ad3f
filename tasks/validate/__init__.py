"""Validate stage: run the data checks, quarantine failing rows with their reasons, and stop on unusable data.

Input: the `LoadResult` of the training file and, when given, of the eval file; optionally the base model's
tokenizer (for the token-length checks; without it they are skipped and the report says so). Output, under
`out_dir`:

- `train.jsonl`, `eval.jsonl`: the kept canonical records (the eval split is made here, before any augmentation,
  when no eval file is given: `data.eval_fraction` of the kept training rows, by a seeded hash of the row ids);
- `quarantine.jsonl`: one line per rejected row, `{"file", "line", "split", "id", "reasons", "row"}`: rows the
  loader could not read, and rows that failed a row-error check (each reason is `check_name: explanation and fix`);
- `warnings.jsonl`: one line per kept row with warnings, `{"file", "line", "split", "id", "warnings"}`;
- `validation.json`: rows in / kept / quarantined per file, counts per check, fatal problems, notes and the
  Great Expectations results;
- `data_docs/`: Great Expectations Data Docs, readable offline; `data_docs/index.html` is the summary.

The checks (see `data_checks/checks.py`) run as Great Expectations suites, in this order:

1. `rows-train`, `rows-eval`: the row checks on each file;
2. `near-duplicates`: near-copies among the kept training rows (the first copy is kept);
3. the held-out split, when no eval file is given;
4. `leakage`: training rows that repeat a kept eval row, exactly or nearly, leave train (never eval: the eval set
   stays the set the user gave);
5. `dataset`, `files`, `labels`: whole-dataset checks (row counts, leakage share, quarantined share per file,
   class balance, size advice).

Every input row ends up either kept or quarantined (checked on every run). The stage raises `ValidationFailed`
after writing its outputs when a fatal check fails.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pandas as pd

from data_checks import checks as C
from data_checks.checks import Check, Severity
from data_checks.docs import write_data_docs
from data_checks.similarity import near_copies, near_duplicates
from data_checks.suite import SuiteOutcome, new_context, run_suite
from tasks.config import FewtuneConfig
from tasks.common.records import LoadResult, split_train_eval, write_jsonl

log = logging.getLogger("fewtune.validate")

Records = list[dict[str, Any]]

LOAD_CHECK = "load"  # reason name of rows the loader could not read or normalise
LOAD_DESCRIPTION = "the loader can read and normalise the row"


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


# ----------------------------------------------------------------------------------------------------------------
# Token lengths


_SLOT = "\ue000{}\ue001"  # private-use characters around a message index: text no template adds itself
_SLOT_SPLIT = re.compile("\ue000(\\d+)\ue001")


class _Layout:
    """The chat template's text around the messages of one role sequence: rows then render by concatenation.

    Rendering each row through the Jinja template costs ~50 us; filling the template's literal text around the
    contents costs ~1 us. A layout is checked against the real template on the first row it renders, and dropped
    (`usable` false) when they differ, e.g. for templates that strip or rewrite the content.
    """

    def __init__(self, tokenizer: Any, roles: tuple[str, ...], generation_prompt: bool):
        from tasks.common.models import render

        placeholders = [{"role": r, "content": _SLOT.format(i)} for i, r in enumerate(roles)]
        try:
            parts = _SLOT_SPLIT.split(render(tokenizer, placeholders, add_generation_prompt=generation_prompt))
        except Exception:  # noqa: BLE001 - a template that rejects these roles; role_order reports such rows
            parts = []
        self.literals, self.slots = parts[0::2], [int(i) for i in parts[1::2]]
        self.literal_bytes = sum(len(x.encode()) for x in self.literals)
        self.usable = bool(parts)
        self.verified = False
        self.tokenizer, self.generation_prompt = tokenizer, generation_prompt

    def fill(self, messages: list[dict[str, str]]) -> str:
        from tasks.common.models import render

        out = [self.literals[0]]
        for slot, literal in zip(self.slots, self.literals[1:]):
            out += (messages[slot]["content"], literal)
        text = "".join(out)
        if not self.verified:
            self.verified = True
            self.usable = text == render(self.tokenizer, messages, add_generation_prompt=self.generation_prompt)
        if not self.usable:
            return render(self.tokenizer, messages, add_generation_prompt=self.generation_prompt)
        return text


def _token_counts(tokenizer: Any, texts: list[str]) -> list[int]:
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [len(e) for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def token_columns(records: Records, tokenizer: Any, max_length: int) -> tuple[list[int | None], list[int | None]]:
    """Tokens of each rendered row, and the token where its first assistant answer starts (None: surely fits).

    Rows are tokenized exactly as the train stage does (chat template, no extra special tokens), but only when a
    safe bound says they might not fit: a token covers at least one byte, so a row has at most as many tokens as
    its rendering has bytes (plus a small margin for tokenizers that add a marker per word boundary).
    """
    layouts: dict[tuple[tuple[str, ...], bool], _Layout] = {}

    def layout(roles: tuple[str, ...], generation_prompt: bool) -> _Layout:
        key = (roles, generation_prompt)
        if key not in layouts:
            layouts[key] = _Layout(tokenizer, roles, generation_prompt)
        return layouts[key]

    full: dict[int, str] = {}
    prompt: dict[int, str] = {}
    for pos, record in enumerate(records):
        try:
            messages = record["messages"]
            roles = tuple(m["role"] for m in messages)
            sizes = [len(m["content"].encode("utf-8", "surrogatepass")) for m in messages]
        except (KeyError, TypeError, AttributeError):
            continue  # not a well-formed conversation: role_order / non_empty_content report it
        margin = len(messages) + 4
        whole = layout(roles, False)
        if whole.usable and whole.literal_bytes + sum(sizes) + margin > max_length:
            full[pos] = whole.fill(messages)
        k = roles.index("assistant") if "assistant" in roles else 0
        head = layout(roles[:k], True) if k else None
        if head is not None and head.usable and head.literal_bytes + sum(sizes[:k]) + margin > max_length:
            prompt[pos] = head.fill(messages[:k])
    tokens = dict(zip(full, _token_counts(tokenizer, list(full.values()))))
    starts = dict(zip(prompt, _token_counts(tokenizer, list(prompt.values()))))
    return [tokens.get(i) for i in range(len(records))], [starts.get(i) for i in range(len(records))]


# ----------------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class _Table:
    """Records and their check table (`data_checks.checks.records_frame`), row i of the one for record i."""

    records: Records
    frame: pd.DataFrame

    def keep(self, positions: list[int]) -> _Table:
        if len(positions) == len(self.records):
            return self
        return _Table([self.records[p] for p in positions], C.subset(self.frame, positions))

    def rows_at(self, positions: list[int]) -> dict[int, dict[str, Any]]:
        """Table rows as dicts, for the explanations of flagged rows (fetched in one go: fast)."""
        return dict(zip(positions, self.frame.iloc[positions].to_dict("records"))) if positions else {}


@dataclass
class _Run:
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

    def check_records(self, suite: str, table: _Table, split: str, loaded: LoadResult, checks: list[Check]) -> _Table:
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

    def row_table(self, records: Records, split: str) -> _Table:
        frame = C.records_frame(records, split)
        if self.tokenizer is not None:
            tokens, starts = token_columns(records, self.tokenizer, self.cfg.model.max_length)
            frame["tokens"] = pd.array(tokens, dtype="Int64")
            frame["answer_start_token"] = pd.array(starts, dtype="Int64")
        return _Table(records, frame)


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


def _reject_entries(loaded: LoadResult, split: str) -> Records:
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


def _top_reasons(entries: Records, n: int = 3) -> str:
    names = Counter(reason.split(":", 1)[0] for e in entries for reason in e["reasons"])
    return ", ".join(f"{name} ({count})" for name, count in names.most_common(n))


def _near_duplicates(run: _Run, table: _Table, loaded: LoadResult) -> _Table:
    """Quarantine training rows that nearly repeat an earlier kept row (suite `near-duplicates`)."""
    v = run.cfg.validate_
    frame = table.frame.copy()
    found = near_duplicates(
        frame["prompt"].tolist(), frame["answer"].tolist(),
        threshold=v.near_dup_threshold, shingle_size=v.shingle_size, num_perm=v.minhash_permutations,
    )
    originals = table.rows_at(sorted({m.other for m in found.values()}))
    frame["near_dup_of"] = pd.Series({p: C.where(originals[m.other]) for p, m in found.items()}, dtype="object")
    frame["near_dup_prompt_sim"] = pd.Series({p: m.prompt_similarity for p, m in found.items()}, dtype="float64")
    frame["near_dup_answer_sim"] = pd.Series({p: m.answer_similarity for p, m in found.items()}, dtype="float64")
    checks = C.near_duplicate_checks(v.near_dup_threshold)
    return run.check_records("near-duplicates", _Table(table.records, frame), "train", loaded, checks)


def _leakage(run: _Run, train: _Table, evals: _Table, loaded: LoadResult) -> tuple[_Table, int]:
    """Training rows that repeat a kept eval row leave train (suite `leakage`); returns them and the eval rows hit."""
    v = run.cfg.validate_
    frame = train.frame.copy()
    eval_frame = evals.frame
    first_eval = eval_frame.drop_duplicates("leak_key")
    eval_where = {key: C.where(r) for key, r in zip(first_eval["leak_key"], first_eval.to_dict("records"))}
    frame["exact_leak_of"] = frame["leak_key"].map(eval_where).astype("object")
    train_keys = set(frame["leak_key"])
    leaked_eval = {pos for pos, key in enumerate(eval_frame["leak_key"]) if key in train_keys}
    if v.near_duplicates:
        found = near_copies(
            frame["prompt"].tolist(), frame["answer"].tolist(),
            eval_frame["prompt"].tolist(), eval_frame["answer"].tolist(),
            threshold=v.near_dup_threshold, shingle_size=v.shingle_size, num_perm=v.minhash_permutations,
        )
        exact = frame["exact_leak_of"]
        near = {p: m[0] for p, m in found.items() if pd.isna(exact.iat[p])}
        leaked_eval.update(m.other for matches in found.values() for m in matches)
        hit = evals.rows_at(sorted({m.other for m in near.values()}))
        frame["near_leak_of"] = pd.Series({p: C.where(hit[m.other]) for p, m in near.items()}, dtype="object")
        frame["near_leak_prompt_sim"] = pd.Series({p: m.prompt_similarity for p, m in near.items()}, dtype="float64")
        frame["near_leak_answer_sim"] = pd.Series({p: m.answer_similarity for p, m in near.items()}, dtype="float64")
    checks = C.leakage_checks(v.near_duplicates, v.near_dup_threshold)
    kept = run.check_records("leakage", _Table(train.records, frame), "train", loaded, checks)
    return kept, len(leaked_eval)


def validate_dataset(
    train: LoadResult, eval: LoadResult | None, cfg: FewtuneConfig, out_dir: Path, tokenizer: Any = None
) -> ValidationResult:
    """Check, split and quarantine; write the kept rows, the quarantine, the report and Data Docs under `out_dir`."""
    out_dir = Path(out_dir)
    v = cfg.validate_
    docs_dir = out_dir / "data_docs"
    if docs_dir.exists():
        shutil.rmtree(docs_dir)  # pages of an earlier attempt would mix with this one's
    run = _Run(cfg, None, tokenizer)
    run.context = new_context(docs_dir)
    max_length = cfg.model.max_length if tokenizer is not None else None
    if tokenizer is None:
        run.notes.append(
            "token-length checks skipped: no base model tokenizer was given (validate.token_checks=false, or "
            "`fewtune validate` without --model)"
        )
    row_checks = C.row_checks(v.max_chars, max_length, v.pii)
    run.quarantined[LOAD_CHECK] = run.flagged[LOAD_CHECK] = len(train.rejects)
    run.descriptions[LOAD_CHECK] = (Severity.ROW_ERROR.value, LOAD_DESCRIPTION, "")
    run.quarantine["train"] = _reject_entries(train, "train")
    run.lap("setup")

    # 1. Row checks, file by file.
    train_kept = run.check_records("rows-train", run.row_table(train.records, "train"), "train", train, row_checks)
    if eval is not None:
        run.quarantine["eval"] = _reject_entries(eval, "eval")
        run.quarantined[LOAD_CHECK] += len(eval.rejects)
        run.flagged[LOAD_CHECK] += len(eval.rejects)
        eval_table = run.check_records("rows-eval", run.row_table(eval.records, "eval"), "eval", eval, row_checks)
    run.lap("row_checks")

    # 2. Near-duplicates among the kept training rows.
    if v.near_duplicates:
        train_kept = _near_duplicates(run, train_kept, train)
        run.lap("near_duplicates")
    else:
        run.notes.append("near-duplicate and near-leakage search off (validate.near_duplicates=false)")

    # 3. Held-out split of the clean rows, before any augmentation.
    if eval is None:
        split_train, split_eval = split_train_eval(train_kept.records, cfg.data.eval_fraction, cfg.data.split_seed)
        position = {id(r): p for p, r in enumerate(train_kept.records)}
        eval_table = train_kept.keep([position[id(r)] for r in split_eval])
        train_table = train_kept.keep([position[id(r)] for r in split_train])
    else:
        train_table = train_kept

    # 4. Leakage: training rows that repeat a kept eval row leave train.
    train_table, leaked_eval = _leakage(run, train_table, eval_table, train)
    train_rows, eval_rows = train_table.records, eval_table.records
    run.lap("split_and_leakage")

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
            "rows_quarantined": len(run.quarantine[role]),
            "kept_as_train": kept_train,
            "kept_as_eval": kept_eval,
        }
        f = files[role]
        if f["rows_in"] != f["rows_kept"] + f["rows_quarantined"]:
            raise RuntimeError(
                f"{loaded.path}: {f['rows_in']} rows read but {f['rows_kept']} kept + {f['rows_quarantined']} "
                "quarantined; this is a bug in the validate stage, please report it with the data file"
            )

    # 5. Whole-dataset checks: fatal conditions and advice.
    quarantine_path = out_dir / "quarantine.jsonl"
    report_path = out_dir / "validation.json"
    eval_file = files.get("eval", {})
    facts = {
        "train_rows": len(train_rows), "eval_rows": len(eval_rows), "eval_source": "split" if eval is None else "file",
        "train_path": train.path, "eval_path": eval.path if eval is not None else train.path,
        "train_rows_in": files["train"]["rows_in"], "train_rows_quarantined": files["train"]["rows_quarantined"],
        "train_rows_kept": files["train"]["rows_kept"], "eval_rows_in": eval_file.get("rows_in", 0),
        "eval_rows_quarantined": eval_file.get("rows_quarantined", 0), "eval_fraction": cfg.data.eval_fraction,
        "quarantine_path": str(quarantine_path), "leaked_eval_rows": leaked_eval,
        "leak_fraction": leaked_eval / len(eval_rows) if eval_rows else 0.0,
        "small_rows": v.small_rows, "recommended_rows": v.recommended_rows, "train_method": cfg.train.method,
        "cv_folds": cfg.cv.folds, "cv_below_rows": cfg.cv.suggest_below_rows,
    }
    run.check_table("dataset", C.dataset_frame(facts),
                    C.dataset_checks(v.min_rows, v.min_eval_rows, v.max_leak_fraction, v.recommended_rows))
    files_table = C.files_frame(files)
    files_table["top_reasons"] = [_top_reasons(run.quarantine[role]) for role in files]
    files_table["quarantine_path"] = str(quarantine_path)
    run.check_table("files", files_table, C.file_checks(cfg.data.max_bad_fraction))
    train_labels, eval_labels = [r.get("label") for r in train_rows], [r.get("label") for r in eval_rows]
    if any(x is not None for x in train_labels + eval_labels):
        run.check_table("labels", C.labels_frame(train_labels, eval_labels), C.label_checks(v.min_label_ratio))
    run.lap("dataset_checks")

    # Warnings of the rows that are kept (a row of the training file may have gone to the eval split).
    eval_ids, train_ids = {id(r) for r in eval_rows}, {id(r) for r in train_rows}
    warned = [
        {**entry, "split": "eval" if key in eval_ids else "train"}
        for key, entry in run.warnings.items()
        if key in eval_ids or key in train_ids
    ]
    warned_by = Counter(w.split(":", 1)[0] for e in warned for w in e["warnings"])
    warned_by.update(run.dataset_warned)

    all_entries = [e for role in run.quarantine for e in sorted(run.quarantine[role], key=lambda e: e["line"] or 0)]
    counts: dict[str, Any] = {
        "usable": not run.problems,
        "problems": run.problems,
        "dataset_warnings": run.dataset_warnings,
        "notes": run.notes,
        "eval_source": facts["eval_source"],
        "files": files,
        "splits": {"train": len(train_rows), "eval": len(eval_rows)},
        "quarantined": len(all_entries),
        "warned_rows": len(warned),
        "leakage": {"eval_rows_in_train": leaked_eval, "fraction": facts["leak_fraction"]},
        "checks": {
            name: {"severity": severity, "description": text, "suite": suite, "flagged": run.flagged[name],
                   "quarantined": run.quarantined[name], "warned": warned_by[name]}
            for name, (severity, text, suite) in run.descriptions.items()
        },
        "timings_s": run.timings,
        "great_expectations": {"success": all(s.success for s in run.suites), "suites": [s.to_dict() for s in run.suites]},
        "settings": {
            **v.model_dump(),
            "max_length": max_length,
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
        train_path=write_rows(out_dir / "train.jsonl", train_rows),
        eval_path=write_rows(out_dir / "eval.jsonl", eval_rows),
        quarantine_path=write_jsonl(quarantine_path, all_entries),
        report_path=report_path,
        warnings_path=write_jsonl(out_dir / "warnings.jsonl", warned),
    )
    run.lap("write_rows")
    result.docs_path = write_data_docs(run.context, docs_dir, counts)
    run.lap("data_docs")
    report_path.write_text(json.dumps(counts, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    log.info(
        "validated: %d train rows, %d eval rows kept; %d quarantined (%s); %d rows with warnings",
        len(train_rows), len(eval_rows), len(all_entries), quarantine_path, len(warned),
    )
    if run.problems:
        raise ValidationFailed(run.problems, report_path, quarantine_path)
    return result


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
