"""Load training data in any accepted shape and normalise it to fewtune's canonical record.

Canonical record (see docs/data.md)::

    {"id": str, "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "label": str | None, "source": "gold"|"self_distilled"|"paraphrase", "parent_id": str | None,
     "line": int}      # where the row came from: line of a JSONL/CSV file, 1-based row of a JSON array,
                       # Parquet file or datasets folder

Accepted row shapes: chat `messages`, `prompt`/`completion`, Alpaca `instruction`/`input`/`output`,
`text`/`label`. Accepted containers: JSONL (or a JSON array), CSV, Parquet, a `datasets.save_to_disk` folder,
or a Hugging Face hub id (`owner/name` or `owner/name:split`). A row must end with the assistant's answer and no
text may be blank (such a row has nothing to learn from); role order, length and duplicates are checked later, by
the validate stage.

Rows without an `id` get `<file stem>-<row number>`, so the same rows get the same ids (and the same train/eval
split) whatever the container. An empty CSV cell is a missing value, as a null is in JSON or Parquet.

A file that cannot be read at all raises `DataError` naming the file, the line and the fix. A single bad row
does not stop the run: it becomes a `Reject` (file, line, raw row, reason) that the validate stage quarantines,
so no input row is ever lost silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

from tasks.common.readers import DataError, iter_raw

FORMATS = ("messages", "prompt_completion", "alpaca", "text_label")
ROLES = ("system", "user", "assistant")
SOURCES = ("gold", "self_distilled", "paraphrase")

_FORMAT_KEYS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text_label": ("text", "label"),
}
_FORMAT_HINT = "rows need `messages`, or `prompt`+`completion`, or `instruction`+`output`, or `text`+`label`"

__all__ = [  # DataError lives in tasks.common.readers and is re-exported here, where callers have always found it
    "FORMATS",
    "ROLES",
    "SOURCES",
    "DataError",
    "LoadResult",
    "Reject",
    "RowError",
    "content_hash",
    "detect_format",
    "load_records",
    "normalize_row",
    "prompt_and_response",
    "read_jsonl",
    "split_train_eval",
    "training_split",
    "write_jsonl",
]


@dataclass
class Reject:
    """An input row that could not be normalised; it goes to quarantine with its reason."""

    file: str
    line: int
    raw: Any
    reason: str

    def to_dict(self) -> dict[str, Any]:
        raw = self.raw
        try:  # kept as is only if it can be written back as UTF-8 JSON (no unpaired surrogates, no odd types)
            json.dumps(raw, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError, RecursionError):
            raw = repr(raw)
        return {"file": self.file, "line": self.line, "row": raw, "reasons": [self.reason]}


@dataclass
class LoadResult:
    path: str
    format: str
    records: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    @property
    def rows_in(self) -> int:
        return len(self.records) + len(self.rejects)


class RowError(ValueError):
    """One row does not fit the detected format (becomes a Reject)."""


# ----------------------------------------------------------------------------------------------------------------
# Normalising rows


def detect_format(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    for fmt, keys in _FORMAT_KEYS.items():
        if all(k in row for k in keys):
            return fmt
    return None


def _unicode(value: str, where: str) -> str:
    """`value` if it can be written as UTF-8; JSON escapes like \\ud800 decode to unpaired surrogates that cannot."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError(
            f"{where} contains an unpaired surrogate ({value[exc.start]!r}), which is not valid Unicode; "
            "fix the \\u escape sequence"
        ) from None
    return value


@overload
def _text(row: dict[str, Any], key: str, *, required: Literal[True] = True) -> str: ...


@overload
def _text(row: dict[str, Any], key: str, *, required: bool) -> str | None: ...


def _text(row: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN from tables
        if required:
            raise RowError(f"`{key}` is missing or null")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"`{key}` must be text, got {type(value).__name__}")
    if required and not str(value).strip():
        raise RowError(f"`{key}` is empty")
    return str(value)


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    msgs = row.get("messages")
    if msgs is None:
        raise RowError("`messages` is missing or null")
    if not isinstance(msgs, list):
        raise RowError(f"`messages` must be a list of {{role, content}} objects, got {type(msgs).__name__}")
    if not msgs:
        raise RowError("`messages` is empty")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowError(f"messages[{i}] must be an object with `role` and `content`, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RowError(f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise RowError(f"messages[{i}].content is empty")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise RowError(
            f"the last message is the {out[-1]['role']}'s; a row must end with the assistant's answer to learn from"
        )
    return out


def normalize_row(row: Any, fmt: str, *, default_id: str, system_prompt: str | None = None) -> dict[str, Any]:
    """Turn one raw row of format `fmt` into a canonical record; raises RowError with the reason."""
    if not isinstance(row, dict):
        raise RowError(f"expected an object with named fields, got {type(row).__name__}")
    label: str | None = None
    if fmt == "messages":
        messages = _messages(row)
        label = _text(row, "label", required=False)
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _text(row, "prompt")}, {"role": "assistant", "content": _text(row, "completion")}]
    elif fmt == "alpaca":
        prompt = _text(row, "instruction")
        extra = _text(row, "input", required=False)
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output")}]
    elif fmt == "text_label":
        label = _text(row, "label")
        messages = [{"role": "user", "content": _text(row, "text")}, {"role": "assistant", "content": label}]
    else:
        raise RowError(f"unknown format {fmt!r}")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    rid = row.get("id")
    if rid is None or (isinstance(rid, float) and rid != rid) or (isinstance(rid, str) and not rid.strip()):
        rid = default_id
    elif isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise RowError(f"`id` must be a string or integer, got {type(rid).__name__}")
    source = row.get("source") or "gold"
    if source not in SOURCES:
        raise RowError(f"`source` is {source!r}; use one of {', '.join(SOURCES)}")
    parent = row.get("parent_id")
    for i, m in enumerate(messages):
        _unicode(m["content"], f"messages[{i}].content")
    return {
        "id": _unicode(str(rid), "`id`"),
        "messages": messages,
        "label": None if label is None else _unicode(label, "`label`"),
        "source": source,
        "parent_id": None if parent is None else _unicode(str(parent), "`parent_id`"),
    }


def load_records(spec: str | Path, fmt: str = "auto", system_prompt: str | None = None) -> LoadResult:
    """Read a data file/folder/hub id and normalise every row. Raises DataError if the container is unusable."""
    spec = str(spec)
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(spec, f"unknown data format {fmt!r}", fix=f"use auto or one of {', '.join(FORMATS)}")
    stem = Path(spec).stem or "row"
    result = LoadResult(path=spec, format=fmt)
    detected_at: int | None = None
    for number, (line, raw, error) in enumerate(iter_raw(spec), 1):
        if error:
            result.rejects.append(Reject(spec, line, raw, error))
            continue
        if result.format == "auto":
            if not isinstance(raw, dict):
                reason = f"expected an object with named fields, got {type(raw).__name__}"
                result.rejects.append(Reject(spec, line, raw, reason))
                continue
            found = detect_format(raw)
            if found is None:
                reason = f"unrecognised row shape (keys: {sorted(raw)}); {_FORMAT_HINT}"
                result.rejects.append(Reject(spec, line, raw, reason))
                continue
            result.format, detected_at = found, line
        row_fmt = detect_format(raw)
        if row_fmt is not None and row_fmt != result.format:
            where = f" (detected from line {detected_at})" if detected_at else ""
            result.rejects.append(
                Reject(spec, line, raw, f"row is in {row_fmt} format but the file is {result.format}{where}")
            )
            continue
        try:
            record = normalize_row(raw, result.format, default_id=f"{stem}-{number}", system_prompt=system_prompt)
        except RowError as exc:
            result.rejects.append(Reject(spec, line, raw, str(exc)))
            continue
        record["line"] = line
        result.records.append(record)
    if result.rows_in == 0:
        raise DataError(spec, "no rows found", fix="add data rows (a header alone or blank lines are not data)")
    if not result.records:
        first = result.rejects[0]
        raise DataError(
            spec,
            f"none of its {len(result.rejects)} rows is usable; first problem: {first.reason}",
            first.line,
            _FORMAT_HINT if "row shape" in first.reason else "fix this row and the rows like it",
        )
    return result


# ----------------------------------------------------------------------------------------------------------------
# Split, hashing, writing


def _row_key(record: dict[str, Any], seed: int) -> str:
    return hashlib.sha256(f"{seed}:{record['id']}".encode()).hexdigest()


def split_train_eval(
    records: list[dict[str, Any]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic split by a seeded hash of each row id: stable across runs and input order.

    Rows derived from another row (augmented rewrites and paraphrases carry `parent_id`) go to the side of their
    parent, so a paraphrase of a held-out row never trains the model that is checked on it. Rows without a parent
    are ranked exactly as before.
    """
    # At least one eval row and at least one training row once there are two rows.
    n_eval = min(len(records) - 1, max(1, round(len(records) * eval_fraction))) if len(records) > 1 else 0
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(str(r.get("parent_id") or r["id"]), []).append(r)
    eval_ids: set[Any] = set()
    for key in sorted(groups, key=lambda k: _row_key({"id": k}, seed)):
        if len(eval_ids) >= n_eval:
            break
        if len(records) - len(eval_ids) - len(groups[key]) >= 1:
            eval_ids.update(r["id"] for r in groups[key])
    if n_eval and not eval_ids:  # one family holds all rows but a few: hold out single rows rather than none
        eval_ids = {r["id"] for r in sorted(records, key=lambda r: _row_key(r, seed))[:n_eval]}
    train = [r for r in records if r["id"] not in eval_ids]
    evals = [r for r in records if r["id"] in eval_ids]
    return train, evals


def content_hash(records: list[dict[str, Any]]) -> str:
    """Hash of the rows' content (ids, messages, labels, provenance), independent of file type and line numbers."""
    h = hashlib.sha256()
    for r in records:
        core = {k: r.get(k) for k in ("id", "messages", "label", "source", "parent_id")}
        h.update(json.dumps(core, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def user_text(record: dict[str, Any]) -> str:
    """The record's last user message (the question or the text to label); empty when it has none."""
    users = [m["content"] for m in record["messages"] if m["role"] == "user"]
    return users[-1] if users else ""


def prompt_and_response(record: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """Split a record into the conversation before its final assistant turn and that turn's text."""
    messages = record["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError(f"row {record.get('id')}: the last message must be the assistant's answer")
    return messages[:-1], messages[-1]["content"]


def training_split(records: list[dict[str, Any]], validation_fraction: float, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The train stage's rows and its validation slice (held out for early stopping), the one split training,
    evaluation (which rows were trained on) and the health checks (tokens that carried loss) all read."""
    return split_train_eval(records, validation_fraction, seed)
