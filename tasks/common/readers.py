"""Reading data containers into (line, raw row | error) pairs: JSONL or a JSON array, CSV, Parquet, a
`datasets.save_to_disk` folder, or a Hugging Face hub id. A file that cannot be read at all raises `DataError`
naming the file, the line and the fix; a single unreadable row is yielded with its problem, never dropped."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CSV_FIELD_LIMIT = 1 << 30  # characters per CSV field; the csv module's default (131,072) would stop the whole file


class DataError(ValueError):
    """A data file that cannot be used. The message names the file, the line and what to do."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None, fix: str | None = None):
        self.path, self.line, self.problem, self.fix = str(path), line, problem, fix
        where = f"{path}, line {line}" if line else str(path)
        msg = f"{where}: {problem}"
        if fix:
            msg += f"\n  fix: {fix}"
        super().__init__(msg)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    data = path.read_bytes()
    if not data.strip():
        raise DataError(path, "the file is empty", fix="add rows, one JSON object per line")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.lstrip().startswith(b"["):
        # A JSON array of rows (.json files often are), unless more JSON follows it: then the file is JSON Lines
        # whose first row happens to be an array, and that row is rejected below like any other non-object row.
        try:
            text = data.decode("utf-8")
            rows, end = json.JSONDecoder().raw_decode(text, len(text) - len(text.lstrip()))
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise DataError(path, "the file is not valid UTF-8", line, "re-save the file as UTF-8") from None
        except json.JSONDecodeError as exc:
            raise DataError(path, f"not valid JSON: {exc.msg}", exc.lineno, "fix the JSON syntax near that line") from None
        except (ValueError, RecursionError) as exc:  # an integer too long to convert, nesting too deep
            raise DataError(path, f"not usable JSON: {_json_problem(exc)}", fix="fix or remove that value") from None
        if not text[end:].strip():
            for i, row in enumerate(rows, 1):
                yield i, row, None
            return
    for lineno, raw_line in enumerate(data.split(b"\n"), 1):
        if not raw_line.strip():
            continue
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError:
            yield lineno, raw_line.decode("utf-8", errors="replace"), "invalid UTF-8 bytes in this line"
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            yield lineno, text, f"not valid JSON ({exc.msg} at column {exc.colno})"
            continue
        except (ValueError, RecursionError) as exc:  # an integer too long to convert, nesting too deep
            yield lineno, text, f"not usable JSON ({_json_problem(exc)})"
            continue
        yield lineno, row, None


def _json_problem(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(";")[0]


def _iter_csv(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    data = path.read_bytes()
    if not data.strip():
        raise DataError(path, "the file is empty", fix="add a header row and data rows")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(path, "the file is not valid UTF-8", line, "re-save the CSV as UTF-8") from None
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))  # long fields reach the length checks
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:  # only a byte-order mark
        raise DataError(path, "the file is empty", fix="add a header row and data rows") from None
    except csv.Error as exc:
        raise DataError(path, f"CSV header unreadable: {exc}", 1) from None
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        raise DataError(path, f"duplicate column names in the header: {header}", 1, "give every column a unique name")
    start = reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(
                path, f"CSV syntax error: {exc}", reader.line_num, 'quote fields containing commas or newlines with ""'
            ) from None
        line = start
        start = reader.line_num + 1
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            yield line, values, f"{len(values)} fields but the header has {len(header)}"
            continue
        row: dict[str, Any] = {k: (v if v != "" else None) for k, v in zip(header, values)}
        if "messages" in row and isinstance(row["messages"], str):
            try:
                row["messages"] = json.loads(row["messages"])
            except json.JSONDecodeError as exc:
                yield line, row, f"`messages` column is not a JSON list ({exc.msg})"
                continue
        yield line, row, None


def _iter_table_rows(rows: list[dict[str, Any]]) -> Iterator[tuple[int, Any, str | None]]:
    for i, row in enumerate(rows, 1):
        yield i, row, None


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise DataError(path, f"not a readable Parquet file ({exc})", fix="re-export the table as Parquet") from None
    yield from _iter_table_rows(table.to_pylist())


def _iter_hf(spec: str) -> Iterator[tuple[int, Any, str | None]]:
    import datasets

    path = Path(spec)
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        else:
            name, _, split = spec.partition(":")
            ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:
        raise DataError(
            spec,
            f"could not load it as a Hugging Face dataset ({type(exc).__name__}: {exc})",
            fix="give a .jsonl/.csv/.parquet file, a save_to_disk folder, or a reachable hub id (owner/name[:split])",
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    yield from _iter_table_rows(ds.to_list())


def iter_raw(spec: str) -> Iterator[tuple[int, Any, str | None]]:
    """(line, raw row, problem or None) for every row of a file, folder or hub id; DataError if it is unusable."""
    path = Path(spec)
    if path.is_dir():
        return _iter_hf(spec)
    if not path.exists():
        if "/" in spec and not spec.startswith((".", "/")) and not Path(spec).suffix:
            return _iter_hf(spec)
        raise DataError(spec, "no such file or folder", fix="check the path (relative paths start at the config file)")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _iter_jsonl(path)
    if suffix == ".csv":
        return _iter_csv(path)
    if suffix in (".parquet", ".pq"):
        return _iter_parquet(path)
    raise DataError(path, f"unsupported file type {suffix or '(none)'}", fix="use .jsonl, .json, .csv or .parquet")
