"""The named data checks of the validate stage, each with a severity.

- **fatal**: the run stops with a message naming the file, the problem and the fix (too few rows, too many
  quarantined, leakage above `validate.max_leak_fraction`);
- **row error**: the row is quarantined with the check's name and explanation;
- **warning**: the row (or dataset) is kept and the finding reported.

Each check is one Great Expectations expectation over a table, plus a human explanation of a failing table row.
The tables are built here with vectorised pandas operations (helper columns such as `max_content_chars`,
`exact_leak_of`, `near_dup_of`), so expectations compare plain columns:

- `records_frame`: one row per record of one file (row checks, near-duplicates, leakage);
- `dataset_frame`: one row for the whole dataset (row counts, leakage share, size advice);
- `files_frame`: one row per input file (share quarantined);
- `labels_frame`: one row per label (class balance, eval labels unseen in training).

To add a check: add a column to the table if it needs one, then a `Check` to the matching list below.

Uniqueness checks (`keep_first=True`): Great Expectations flags every copy of a repeated value. The first copy in
file order that passes every other check is kept; the later copies are quarantined.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import great_expectations.expectations as gxe
import pandas as pd

from data_checks import text as T
from data_checks.expectations import (
    ExpectColumnValuesToBeCleanText,
    ExpectColumnValuesToNotBeMojibake,
    ExpectColumnValuesToNotContainPii,
)

# Optional system message, then user/assistant turns alternating, ending with the assistant's answer.
ROLE_PATTERN = r"^(?:system,)?user,assistant(?:,user,assistant)*$"
ROLE_ORDER_HINT = "an optional system message first, then user and assistant turns alternating, ending with assistant"

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


# ----------------------------------------------------------------------------------------------------------------
# Tables


def _record_fields(record: dict[str, Any]) -> tuple[str, str, str, str, int, int, str]:
    """roles, text, prompt, answer, min stripped length, max length, content key of one record."""
    try:  # records from the loader: a list of {role: str, content: str}
        messages = record["messages"]
        role = [m["role"] for m in messages]
        content = [m["content"] for m in messages]
        stripped = [c.strip() for c in content]
        roles = ",".join(role)
    except (KeyError, TypeError, AttributeError):  # records built some other way: anything goes
        messages = [m for m in (record.get("messages") or []) if isinstance(m, dict)]
        role = [r if isinstance(r := m.get("role"), str) else "?" for m in messages]
        content = [c if isinstance(c := m.get("content"), str) else "" for m in messages]
        stripped = [c.strip() for c in content]
        roles = ",".join(role)
    return (
        roles,
        "\n".join(content),
        "\n".join([c for r, c in zip(role, stripped) if r == "user"]),
        "\n".join([c for r, c in zip(role, stripped) if r == "assistant"]),
        min(map(len, stripped), default=0),
        max(map(len, content), default=0),
        roles + SEP + SEP.join(stripped),
    )


def records_frame(records: list[dict[str, Any]], split: str) -> pd.DataFrame:
    """One table row per record; `position` is the record's index in `records`.

    Columns: id, line, split, roles (comma-joined), min_content_chars (after stripping), max_content_chars, text
    (every message), prompt (user turns), answer (assistant turns), content_key (hash of the roles and stripped
    text: equal for exact duplicates), leak_key (prompt and answer: equal for the same example). Only `text` is a pandas string
    column (fast regular expressions); the other texts stay Python objects (cheap to build and to hash).
    """
    fields = list(map(_record_fields, records))
    roles, texts, prompts, answers, min_chars, max_chars, content_keys = ([f[i] for f in fields] for i in range(7))
    obj = lambda values: pd.Series(values, dtype="object")  # noqa: E731
    frame = pd.DataFrame(
        {
            POSITION: range(len(records)),
            "id": obj([r.get("id") for r in records]),
            "line": pd.array([r.get("line") for r in records], dtype="Int64"),
            "split": split,
            "roles": obj(roles),
            "min_content_chars": pd.array(min_chars, dtype="int64"),
            "max_content_chars": pd.array(max_chars, dtype="int64"),
            "text": pd.Series(texts, dtype="str"),
            "prompt": obj(prompts),
            "answer": obj(answers),
            # 64-bit hash of the roles and stripped texts: equal for exact duplicates (a collision between two
            # different rows is a 1-in-10^9 event at 100,000 rows), and cheap to hash again for Great Expectations.
            "content_key": pd.array([hash(k) for k in content_keys], dtype="int64"),
        }
    )
    frame["leak_key"] = obj([p + SEP + SEP + a for p, a in zip(prompts, answers)])
    return frame


def subset(frame: pd.DataFrame, positions: list[int]) -> pd.DataFrame:
    """The rows at `positions`, renumbered: `position` is again the index in the matching list of records."""
    part = frame.iloc[positions].reset_index(drop=True)
    part[POSITION] = range(len(part))
    return part


def dataset_frame(facts: dict[str, Any]) -> pd.DataFrame:
    """A one-row table of dataset facts (row counts, leakage share, file paths for the messages)."""
    return pd.DataFrame([{POSITION: 0, **facts}])


def files_frame(files: dict[str, dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for i, (role, f) in enumerate(files.items()):
        share = f["rows_quarantined"] / f["rows_in"] if f["rows_in"] else 0.0
        rows.append({POSITION: i, "role": role, **f, "bad_fraction": share})
    return pd.DataFrame(rows)


def labels_frame(train_labels: list[str | None], eval_labels: list[str | None]) -> pd.DataFrame:
    """One row per label seen in train or eval: counts, share of train, ratio to the most common train label."""
    train = pd.Series([x for x in train_labels if x is not None], dtype="object").value_counts()
    evals = pd.Series([x for x in eval_labels if x is not None], dtype="object").value_counts()
    labels = sorted(set(train.index) | set(evals.index), key=str)
    largest = int(train.max()) if len(train) else 0
    total = int(train.sum()) if len(train) else 0
    rows = []
    for i, label in enumerate(labels):
        n = int(train.get(label, 0))
        rows.append(
            {
                POSITION: i,
                "label": str(label),
                "train_count": n,
                "eval_count": int(evals.get(label, 0)),
                "train_share": n / total if total else 0.0,
                # None for a label with no training row: label_seen_in_train reports it, not label_balance
                "ratio_to_largest": n / largest if n else None,
                "largest": largest,
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# Explanations that look at the record


def _message_where(record: dict[str, Any] | None, test: Callable[[str], Any]) -> str:
    """`messages[i] (role)` of the first message whose content passes `test`."""
    for i, m in enumerate((record or {}).get("messages") or []):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str) and test(content):
            return f"messages[{i}] ({m.get('role')})"
    return "a message"


def _finding(record: dict[str, Any] | None, finder: Callable[[str], str | None]) -> str:
    for i, m in enumerate((record or {}).get("messages") or []):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str) and (found := finder(content)):
            return f"messages[{i}] ({m.get('role')}): {found}"
    return "a message"


def _longest(record: dict[str, Any] | None) -> str:
    messages = [m for m in (record or {}).get("messages") or [] if isinstance(m, dict)]
    if not messages:
        return "a message"
    i = max(range(len(messages)), key=lambda k: len(messages[k].get("content") or ""))
    return f"messages[{i}] ({messages[i].get('role')})"


# ----------------------------------------------------------------------------------------------------------------
# Row checks: each file on its own


def row_checks(max_chars: int, max_length: int | None, pii: bool) -> list[Check]:
    """Checks applied to the rows of each input file on its own.

    `max_length` (the model's `model.max_length`) enables the token-length checks; they need the token columns
    that `tasks.validate` adds with the base model's tokenizer.
    """
    checks = [
        Check(
            name="id_present",
            severity=Severity.ROW_ERROR,
            description="every row has an id",
            expectation=gxe.ExpectColumnValuesToNotBeNull(column="id"),
            explain=lambda row, rec: "the row has no id; give it an `id` field (or drop the field to get a line-based id)",
        ),
        Check(
            name="unique_id",
            severity=Severity.ROW_ERROR,
            description="ids are unique within a file",
            expectation=gxe.ExpectColumnValuesToBeUnique(column="id"),
            explain=lambda row, rec: f"id {row['id']!r} is used by more than one row; give every row its own id",
            keep_first=True,
        ),
        Check(
            name="role_order",
            severity=Severity.ROW_ERROR,
            description=f"message roles follow {ROLE_ORDER_HINT}",
            expectation=gxe.ExpectColumnValuesToMatchRegex(column="roles", regex=ROLE_PATTERN),
            explain=lambda row, rec: (
                f"roles are {row['roles']}; expected {ROLE_ORDER_HINT}; reorder, merge or complete the turns"
            ),
        ),
        Check(
            name="non_empty_content",
            severity=Severity.ROW_ERROR,
            description="every message has text other than whitespace",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="min_content_chars", min_value=1),
            explain=lambda row, rec: (
                f"{_message_where(rec, lambda c: not c.strip())} is empty or only whitespace; "
                "write its text or drop the message"
            ),
        ),
        Check(
            name="max_chars",
            severity=Severity.ROW_ERROR,
            description=f"every message is at most {max_chars} characters (validate.max_chars)",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="max_content_chars", max_value=max_chars),
            explain=lambda row, rec: (
                f"{_longest(rec)} has {row['max_content_chars']} characters, above validate.max_chars={max_chars}; "
                "shorten or split it, or raise validate.max_chars"
            ),
        ),
        Check(
            name="control_characters",
            severity=Severity.ROW_ERROR,
            description="no control characters, zero-width spaces, stray byte-order marks or bidi overrides",
            expectation=ExpectColumnValuesToBeCleanText(column="text"),
            explain=lambda row, rec: (
                f"{_finding(rec, T.control_character)}; such characters are invisible or display differently from "
                "what the model reads; remove them"
            ),
        ),
        Check(
            name="mojibake",
            severity=Severity.ROW_ERROR,
            description="text decoded with the right encoding (no `cafÃ©`, no U+FFFD)",
            expectation=ExpectColumnValuesToNotBeMojibake(column="text"),
            explain=lambda row, rec: (
                f"{_finding(rec, T.mojibake)}; re-export the source as UTF-8 (or repair the text with ftfy.fix_text)"
            ),
        ),
        Check(
            name="exact_duplicate",
            severity=Severity.ROW_ERROR,
            description="no two rows have the same messages",
            expectation=gxe.ExpectColumnValuesToBeUnique(column="content_key"),
            explain=lambda row, rec: "the same messages appear in more than one row; drop the extra copies",
            keep_first=True,
        ),
    ]
    if max_length is not None:
        checks += [
            Check(
                name="answer_within_max_length",
                severity=Severity.ROW_ERROR,
                description=f"the first answer starts within model.max_length={max_length} tokens",
                expectation=gxe.ExpectColumnValuesToBeBetween(column="answer_start_token", max_value=max_length - 1),
                explain=lambda row, rec: (
                    f"the first assistant answer starts at token {row['answer_start_token']}, beyond "
                    f"model.max_length={max_length}: training would cut it away and learn nothing from this row; "
                    "shorten the prompt or raise model.max_length"
                ),
            ),
            Check(
                name="fits_max_length",
                severity=Severity.WARNING,
                description=f"the row fits in model.max_length={max_length} tokens (else its end is cut in training)",
                expectation=gxe.ExpectColumnValuesToBeBetween(column="tokens", max_value=max_length),
                explain=lambda row, rec: (
                    f"{row['tokens']} tokens, above model.max_length={max_length}: the last "
                    f"{row['tokens'] - max_length} tokens are cut in training; raise model.max_length to keep them"
                ),
            ),
        ]
    if pii:
        kinds = {"email": "email addresses", "phone": "phone numbers", "card": "card-like numbers (Luhn-valid)"}
        for kind, label in kinds.items():
            finder = T.PII_FINDERS[kind]
            checks.append(
                Check(
                    name=f"pii_{kind}",
                    severity=Severity.WARNING,
                    description=f"no {label} in the text",
                    expectation=ExpectColumnValuesToNotContainPii(column="text", kind=kind),
                    explain=lambda row, rec, finder=finder: (
                        f"{_finding(rec, finder)}; a fine-tuned model can repeat personal data verbatim: remove or "
                        "mask it unless it is meant to be learned (e.g. your own support address)"
                    ),
                )
            )
    return checks


# ----------------------------------------------------------------------------------------------------------------
# Near-duplicates within train, leakage between train and eval


def near_duplicate_checks(threshold: float) -> list[Check]:
    """Checks of the kept training rows against each other (column `near_dup_of`, from data_checks.similarity)."""
    return [
        Check(
            name="near_duplicate",
            severity=Severity.ROW_ERROR,
            description=f"no row nearly repeats an earlier row (prompt and answer similarity >= {threshold})",
            expectation=gxe.ExpectColumnValuesToBeNull(column="near_dup_of"),
            explain=lambda row, rec: (
                f"nearly repeats {row['near_dup_of']} (prompt similarity {row['near_dup_prompt_sim']:.2f}, answer "
                f"{row['near_dup_answer_sim']:.2f}; validate.near_dup_threshold={threshold}), which is kept; copies "
                "weigh one example several times and invite memorisation: drop this copy or make it a real variation"
            ),
        )
    ]


def leakage_checks(near: bool, threshold: float) -> list[Check]:
    """Checks of the training rows against the kept eval rows (columns `exact_leak_of`, `near_leak_of`).

    A training row that repeats an eval row is quarantined from train, so the eval set stays exactly the set the
    user gave (or the split made) and still measures unseen examples.
    """
    checks = [
        Check(
            name="train_eval_leakage",
            severity=Severity.ROW_ERROR,
            description="no training row repeats an eval row's prompt and answer",
            expectation=gxe.ExpectColumnValuesToBeNull(column="exact_leak_of"),
            explain=lambda row, rec: (
                f"same prompt and answer as eval row {row['exact_leak_of']}; removed from train so the eval score "
                "measures unseen examples; drop one of the two copies to keep this row in training"
            ),
        )
    ]
    if near:
        checks.append(
            Check(
                name="train_eval_near_leakage",
                severity=Severity.ROW_ERROR,
                description=f"no training row nearly repeats an eval row (similarity >= {threshold})",
                expectation=gxe.ExpectColumnValuesToBeNull(column="near_leak_of"),
                explain=lambda row, rec: (
                    f"nearly repeats eval row {row['near_leak_of']} (prompt similarity {row['near_leak_prompt_sim']:.2f}, "
                    f"answer {row['near_leak_answer_sim']:.2f}; validate.near_dup_threshold={threshold}); removed from "
                    "train so the eval score measures unseen examples"
                ),
            )
        )
    return checks


# ----------------------------------------------------------------------------------------------------------------
# Dataset checks: whole-dataset facts, files, labels


def _size_advice(row: dict[str, Any], rec: Any) -> str:
    n, small, recommended = row["train_rows"], row["small_rows"], row["recommended_rows"]
    method = row["train_method"]
    if method == "full":
        plan = (
            "train.method=full updates every weight and will likely memorise rows this few; "
            "use train.method=auto or lora (a PEFT adapter)"
        )
    else:
        plan = f"train.method={method}: fewtune trains a parameter-efficient adapter, which suits this size"
    cv = ""
    if row.get("cv_folds", 1) <= 1 and n < row.get("cv_below_rows", 0):
        cv = (
            f"; under {row['cv_below_rows']} rows (cv.suggest_below_rows) one test split's score moves a lot with "
            "which rows land in it: cv.folds=5 trains 5 adapters and reports the mean ± spread before the final one"
        )
    if n < small:
        return (
            f"{n} training rows, under {small} (validate.small_rows): expect the model to repeat training answers "
            f"verbatim; {plan}, stops early on a validation slice, and the evaluate stage measures memorisation and "
            f"forgetting; add rows (or augment.enabled=true for paraphrases) if you can{cv}"
        )
    return (
        f"{n} training rows, under the ~{recommended:,} per task that vanilla fine-tuning needs "
        f"(validate.recommended_rows); {plan}, with early stopping on a validation slice{cv}"
    )


def dataset_checks(min_rows: int, min_eval_rows: int, max_leak_fraction: float, recommended_rows: int) -> list[Check]:
    """Checks of the whole dataset after the row checks (table: `dataset_frame`)."""

    def too_few_train(row: dict[str, Any], rec: Any) -> str:
        note = f"{row['train_rows_in']} read, {row['train_rows_quarantined']} quarantined"
        if row["eval_source"] == "split":
            note += f", {row['eval_rows']} held out for eval"
        return (
            f"{row['train_path']}: {row['train_rows']} usable training rows, fewer than validate.min_rows="
            f"{min_rows} ({note})\n  fix: add training rows or correct the quarantined ones "
            f"(see {row['quarantine_path']}), or lower validate.min_rows"
        )

    def too_few_eval(row: dict[str, Any], rec: Any) -> str:
        if row["eval_source"] == "split":
            return (
                f"{row['train_path']}: the held-out split has {row['eval_rows']} eval rows (data.eval_fraction="
                f"{row['eval_fraction']} of {row['train_rows_kept']} usable rows), fewer than "
                f"validate.min_eval_rows={min_eval_rows}\n"
                "  fix: give an eval file as data.eval, raise data.eval_fraction, or add training rows"
            )
        return (
            f"{row['eval_path']}: {row['eval_rows']} usable eval rows, fewer than validate.min_eval_rows="
            f"{min_eval_rows} ({row['eval_rows_in']} read, {row['eval_rows_quarantined']} quarantined)\n"
            f"  fix: add eval rows or correct the quarantined ones (see {row['quarantine_path']}), "
            "or lower validate.min_eval_rows"
        )

    def leaking(row: dict[str, Any], rec: Any) -> str:
        return (
            f"{row['eval_path']}: {row['leaked_eval_rows']} of {row['eval_rows']} eval rows "
            f"({row['leak_fraction']:.0%}) also appear in the training data ({row['train_path']}), exactly or nearly; "
            f"above validate.max_leak_fraction={max_leak_fraction}: the eval set is not held out\n"
            "  fix: build the eval set from rows that are not in the training file (e.g. omit data.eval to let "
            "fewtune split), or raise validate.max_leak_fraction"
        )

    return [
        Check(
            name="min_rows",
            severity=Severity.FATAL,
            description=f"at least {min_rows} usable training rows (validate.min_rows)",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="train_rows", min_value=min_rows),
            explain=too_few_train,
        ),
        Check(
            name="min_eval_rows",
            severity=Severity.FATAL,
            description=f"at least {min_eval_rows} usable eval rows (validate.min_eval_rows)",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="eval_rows", min_value=min_eval_rows),
            explain=too_few_eval,
        ),
        Check(
            name="max_leakage",
            severity=Severity.FATAL,
            description=f"at most {max_leak_fraction:.0%} of eval rows also in train (validate.max_leak_fraction)",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="leak_fraction", max_value=max_leak_fraction),
            explain=leaking,
        ),
        Check(
            name="dataset_size",
            severity=Severity.WARNING,
            description=f"at least {recommended_rows:,} training rows (validate.recommended_rows)",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="train_rows", min_value=recommended_rows),
            explain=_size_advice,
        ),
    ]


def _top_reasons(row: dict[str, Any]) -> str:
    return row.get("top_reasons") or ""


def file_checks(max_bad_fraction: float) -> list[Check]:
    """Checks per input file (table: `files_frame`)."""
    return [
        Check(
            name="max_bad_fraction",
            severity=Severity.FATAL,
            description=f"at most {max_bad_fraction:.0%} of a file's rows quarantined (data.max_bad_fraction)",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="bad_fraction", max_value=max_bad_fraction),
            explain=lambda row, rec: (
                f"{row['path']}: {row['rows_quarantined']} of {row['rows_in']} rows ({row['bad_fraction']:.0%}) are "
                f"quarantined, above data.max_bad_fraction={max_bad_fraction}; most frequent: {_top_reasons(row)}\n"
                f"  fix: correct the rows listed in {row['quarantine_path']} (each names its line and reason), "
                "or raise data.max_bad_fraction"
            ),
        )
    ]


def label_checks(min_label_ratio: float) -> list[Check]:
    """Class balance of classification data (table: `labels_frame`; only when rows carry labels)."""
    return [
        Check(
            name="label_balance",
            severity=Severity.WARNING,
            description=f"every label has at least {min_label_ratio:.0%} as many training rows as the most common "
            "(validate.min_label_ratio)",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="ratio_to_largest", min_value=min_label_ratio),
            explain=lambda row, rec: (
                f"label {row['label']!r} has {row['train_count']} training rows, {row['ratio_to_largest']:.0%} of the "
                f"most common label's {row['largest']}: the model will favour the common labels; add rows of this "
                "label (or fewer of the common ones)"
            ),
        ),
        Check(
            name="label_seen_in_train",
            severity=Severity.WARNING,
            description="every eval label also appears in the training rows",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="train_count", min_value=1),
            explain=lambda row, rec: (
                f"label {row['label']!r} appears in {row['eval_count']} eval rows but in no training row: the model "
                "cannot learn it; add training rows with this label"
            ),
        ),
    ]


def duplicate_note(row: dict[str, Any], kept: dict[str, Any], kept_is_usable: bool) -> str:
    """Tail of a uniqueness reason: the earlier copy that this row repeats."""
    if kept_is_usable:
        return f"kept copy: {where(kept)}"
    return f"first copy: {where(kept)}, quarantined too"
