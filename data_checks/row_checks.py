"""Checks of single rows (each input file on its own) and across rows: near-duplicates within train, leakage
between train and eval. Each check's explanation names the message at fault and the fix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import great_expectations.expectations as gxe

from data_checks import text as T
from data_checks.core import Check, Severity
from data_checks.expectations import (
    ExpectColumnValuesToBeCleanText,
    ExpectColumnValuesToNotBeMojibake,
    ExpectColumnValuesToNotContainPii,
)

# Optional system message, then user/assistant turns alternating, ending with the assistant's answer.
ROLE_PATTERN = r"^(?:system,)?user,assistant(?:,user,assistant)*$"
ROLE_ORDER_HINT = "an optional system message first, then user and assistant turns alternating, ending with assistant"


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
