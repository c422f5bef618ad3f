"""The named data checks of the validate stage.

Each check is one Great Expectations expectation over a flat table of canonical records (one row per record,
built by `records_frame`), plus a human explanation of why a failing row is quarantined and how to fix it.
A check's name appears in `quarantine.jsonl` reasons and in the counts of `validation.json`.

To add a check: add a column to `records_frame` if it needs one, then a `Check` to `row_checks` (checks within
one file) or `leakage_checks` (checks of the training rows against the eval rows).

Uniqueness checks (`keep_first=True`): Great Expectations flags every copy of a repeated value. The first copy in
file order that passes every other check is kept; the later copies are quarantined.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import great_expectations.expectations as gxe
import pandas as pd

# Optional system message, then user/assistant turns alternating, ending with the assistant's answer.
ROLE_PATTERN = r"^(?:system,)?user,assistant(?:,user,assistant)*$"
ROLE_ORDER_HINT = "an optional system message first, then user and assistant turns alternating, ending with assistant"

# Column that identifies a table row in Great Expectations results (ids can repeat or be missing).
POSITION = "position"


@dataclass(frozen=True)
class Check:
    """One named check: the expectation that finds failing rows and the explanation written for each of them."""

    name: str
    description: str
    expectation: gxe.Expectation
    explain: Callable[[dict[str, Any]], str]
    keep_first: bool = False


def _key(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()


def _flatten(record: dict[str, Any], position: int, split: str) -> dict[str, Any]:
    messages = record.get("messages") or []
    contents = [m.get("content") or "" for m in messages]
    roles = [m.get("role") or "?" for m in messages]
    stripped = [c.strip() for c in contents]
    blank = next((i for i, c in enumerate(stripped) if not c), None)
    longest = max(range(len(contents)), key=lambda i: len(contents[i])) if contents else None
    answer = stripped[-1] if roles and roles[-1] == "assistant" else ""
    user_turns = [c for r, c in zip(roles, stripped) if r == "user"]
    return {
        POSITION: position,
        "id": record.get("id"),
        "line": record.get("line"),
        "split": split,
        "n_messages": len(messages),
        "roles": ",".join(roles),
        "last_role": roles[-1] if roles else "",
        "min_content_chars": min((len(c) for c in stripped), default=0),
        "max_content_chars": max((len(c) for c in contents), default=0),
        "first_blank": "" if blank is None else f"messages[{blank}] ({roles[blank]})",
        "longest": "" if longest is None else f"messages[{longest}] ({roles[longest]})",
        "prompt": "\n\n".join(user_turns),
        "answer": answer,
        # Same roles and same text (ignoring surrounding whitespace): an exact duplicate.
        "content_key": _key([[r, c] for r, c in zip(roles, stripped)]),
        # Same user turns and same answer (the system prompt aside): the same example for leakage purposes.
        "leak_key": _key([user_turns, answer]),
    }


def records_frame(records: list[dict[str, Any]], split: str) -> pd.DataFrame:
    """One table row per record; `position` is the record's index in `records`."""
    rows = [_flatten(r, i, split) for i, r in enumerate(records)]
    columns = list(_flatten({"messages": []}, 0, split))
    return pd.DataFrame(rows, columns=columns)


def _where(row: dict[str, Any]) -> str:
    line = row.get("line")
    return f"line {line} (id {row.get('id')})" if line is not None else f"id {row.get('id')}"


def row_checks(max_chars: int) -> list[Check]:
    """Checks applied to the rows of each input file on its own."""
    return [
        Check(
            name="id_present",
            description="every row has an id",
            expectation=gxe.ExpectColumnValuesToNotBeNull(column="id"),
            explain=lambda row: "the row has no id; give it an `id` field (or drop the field to get a line-based id)",
        ),
        Check(
            name="unique_id",
            description="ids are unique within a file",
            expectation=gxe.ExpectColumnValuesToBeUnique(column="id"),
            explain=lambda row: f"id {row['id']!r} is used by more than one row; give every row its own id",
            keep_first=True,
        ),
        Check(
            name="role_order",
            description=f"message roles follow {ROLE_ORDER_HINT}",
            expectation=gxe.ExpectColumnValuesToMatchRegex(column="roles", regex=ROLE_PATTERN),
            explain=lambda row: (
                f"roles are {row['roles']}; expected {ROLE_ORDER_HINT}; reorder, merge or complete the turns"
            ),
        ),
        Check(
            name="non_empty_content",
            description="every message has text other than whitespace",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="min_content_chars", min_value=1),
            explain=lambda row: f"{row['first_blank']} is empty or only whitespace; write its text or drop the message",
        ),
        Check(
            name="max_length",
            description=f"every message is at most {max_chars} characters (validate.max_chars)",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="max_content_chars", max_value=max_chars),
            explain=lambda row: (
                f"{row['longest']} has {row['max_content_chars']} characters, above validate.max_chars={max_chars}; "
                "shorten or split it, or raise validate.max_chars"
            ),
        ),
        Check(
            name="exact_duplicate",
            description="no two rows have the same messages",
            expectation=gxe.ExpectColumnValuesToBeUnique(column="content_key"),
            explain=lambda row: "the same messages appear in more than one row; drop the extra copies",
            keep_first=True,
        ),
    ]


def leakage_checks(eval_frame: pd.DataFrame) -> list[Check]:
    """Checks of the training rows against the kept eval rows (exact train/eval overlap).

    A training row whose user turns and answer equal an eval row's is quarantined from train, so the eval set
    stays exactly the set the user gave (or the split made) and still measures unseen examples.
    """
    first_seen = eval_frame.drop_duplicates("leak_key").set_index("leak_key")

    def explain(row: dict[str, Any]) -> str:
        hit = first_seen.loc[row["leak_key"]]
        return (
            f"same prompt and answer as eval row {_where(hit.to_dict())}; removed from train so the eval score "
            "measures unseen examples; drop one of the two copies to keep this row in training"
        )

    return [
        Check(
            name="train_eval_leakage",
            description="no training row repeats an eval row's prompt and answer",
            expectation=gxe.ExpectColumnValuesToNotBeInSet(column="leak_key", value_set=sorted(first_seen.index)),
            explain=explain,
        )
    ]


def duplicate_note(row: dict[str, Any], kept: dict[str, Any], kept_is_usable: bool) -> str:
    """Tail of a uniqueness reason: the earlier copy that this row repeats."""
    if kept_is_usable:
        return f"kept copy: {_where(kept)}"
    return f"first copy: {_where(kept)}, quarantined too"
