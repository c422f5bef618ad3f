"""The tables the checks run on, built with vectorised pandas operations (helper columns such as
`max_content_chars`, `exact_leak_of`, `near_dup_of`), so expectations compare plain columns:

- `records_frame`: one row per record of one file (row checks, near-duplicates, leakage);
- `dataset_frame`: one row for the whole dataset (row counts, leakage share, size advice);
- `files_frame`: one row per input file (share quarantined);
- `labels_frame`: one row per label (class balance, eval labels unseen in training).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from data_checks.core import POSITION, SEP


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
