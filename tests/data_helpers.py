"""Shared rows and writers of the data loader tests (tests/test_data_*.py): the same small rows in each accepted
shape, and writers that put rows in each container."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------------
# The same small rows in each accepted shape (tests/test_data_loading.py has the conversation each becomes).

ROWS = {
    "messages": [
        {
            "messages": [
                {"role": "system", "content": "You answer for Kestrel Cycles."},
                {"role": "user", "content": "When are you open?"},
                {"role": "assistant", "content": "9:00 to 17:00, Monday to Friday."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": 'How much is the "Kestrel", the red one?'},
                {"role": "assistant", "content": "€450,\nVAT included."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Do you rent e-bikes?"},
                {"role": "assistant", "content": "Yes, from 35 € a day."},
            ]
        },
    ],
    "prompt_completion": [
        {"prompt": "When are you open?", "completion": "9:00 to 17:00, Monday to Friday."},
        {"prompt": 'How much is the "Kestrel", the red one?', "completion": "€450,\nVAT included."},
        {"prompt": "Do you rent e-bikes?", "completion": "Yes, from 35 € a day."},
    ],
    "alpaca": [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a primary colour.", "input": "", "output": "Red"},
        {"instruction": "Summarise, in one word.", "input": "The bike, sadly, was stolen.", "output": "Theft"},
    ],
    "text_label": [
        {"text": "The bike was great, thanks!", "label": "positive"},
        {"text": "Chain broke after a day.", "label": "negative"},
        {"text": "Is the shop open on Sunday?", "label": "question"},
    ],
}


def chat(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# ----------------------------------------------------------------------------------------------------------------
# Writers: each puts rows in one container named `data` and returns the container's path and the line (or row
# number) where each row starts.


def write_jsonl_file(rows: list[dict], folder: Path) -> tuple[Path, list[int]]:
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path, list(range(1, len(rows) + 1))


def write_json_array(rows: list[dict], folder: Path) -> tuple[Path, list[int]]:
    path = folder / "data.json"
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    return path, list(range(1, len(rows) + 1))


def write_csv(rows: list[dict], folder: Path) -> tuple[Path, list[int]]:
    """A CSV with a header; the `messages` column holds each conversation as a JSON string."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    lines = []
    for row in rows:
        lines.append(out.getvalue().count("\n") + 1)
        cells = {k: json.dumps(v, ensure_ascii=False) if k == "messages" else v for k, v in row.items()}
        writer.writerow(cells)
    path = folder / "data.csv"
    path.write_text(out.getvalue(), encoding="utf-8")
    return path, lines


def write_parquet(rows: list[dict], folder: Path) -> tuple[Path, list[int]]:
    import pandas as pd

    path = folder / "data.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path, list(range(1, len(rows) + 1))


def write_hf_folder(rows: list[dict], folder: Path) -> tuple[Path, list[int]]:
    import datasets

    path = folder / "data"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path, list(range(1, len(rows) + 1))


WRITERS = {
    "jsonl": write_jsonl_file,
    "json": write_json_array,
    "csv": write_csv,
    "parquet": write_parquet,
    "hf_folder": write_hf_folder,
}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path
