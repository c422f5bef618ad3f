"""Tests of the data loader: every row shape from every container, malformed inputs, split and helpers."""

from __future__ import annotations

import csv
import io
import json
import os
import random
from pathlib import Path

import pytest

from tasks.common.records import (
    FORMATS,
    DataError,
    Reject,
    content_hash,
    load_records,
    prompt_and_response,
    read_jsonl,
    split_train_eval,
    write_jsonl,
)

# ----------------------------------------------------------------------------------------------------------------
# The same small rows in each accepted shape, with the canonical conversation each row must become.

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


def _chat(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


EXPECTED_MESSAGES = {
    "messages": [r["messages"] for r in ROWS["messages"]],
    "prompt_completion": [_chat(r["prompt"], r["completion"]) for r in ROWS["prompt_completion"]],
    "alpaca": [
        _chat("Translate to French.\n\nGood morning", "Bonjour"),
        _chat("Name a primary colour.", "Red"),
        _chat("Summarise, in one word.\n\nThe bike, sadly, was stolen.", "Theft"),
    ],
    "text_label": [_chat(r["text"], r["label"]) for r in ROWS["text_label"]],
}
EXPECTED_LABELS = {fmt: [None] * 3 for fmt in FORMATS} | {"text_label": ["positive", "negative", "question"]}
RECORD_KEYS = {"id", "messages", "label", "source", "parent_id", "line"}

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


# ----------------------------------------------------------------------------------------------------------------
# Every shape from every container


@pytest.mark.parametrize("file_type", WRITERS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_from_every_file_type(tmp_path, fmt, file_type):
    path, lines = WRITERS[file_type](ROWS[fmt], tmp_path)

    result = load_records(path)

    assert result.format == fmt
    assert result.path == str(path)
    assert result.rejects == []
    assert len(result.records) == result.rows_in == 3
    for i, record in enumerate(result.records):
        assert set(record) == RECORD_KEYS
        assert record["id"] == f"data-{i + 1}"
        assert record["messages"] == EXPECTED_MESSAGES[fmt][i]
        assert record["label"] == EXPECTED_LABELS[fmt][i]
        assert record["source"] == "gold"
        assert record["parent_id"] is None
        assert record["line"] == lines[i]
        _, answer = prompt_and_response(record)
        assert answer == EXPECTED_MESSAGES[fmt][i][-1]["content"]

    explicit = load_records(path, fmt=fmt)
    assert explicit.format == fmt
    assert explicit.records == result.records


def test_csv_rows_spanning_several_lines_keep_their_starting_line(tmp_path):
    # The second answer holds a newline, so the third row starts one line later than its row number suggests.
    path, lines = write_csv(ROWS["prompt_completion"], tmp_path)
    assert lines == [2, 3, 5]
    assert [r["line"] for r in load_records(path).records] == [2, 3, 5]


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_rows_give_same_content_hash_in_every_file_type(tmp_path, fmt):
    hashes = {}
    for file_type, writer in WRITERS.items():
        folder = tmp_path / file_type
        folder.mkdir()
        path, _ = writer(ROWS[fmt], folder)
        hashes[file_type] = content_hash(load_records(path).records)
    assert len(set(hashes.values())) == 1, hashes


def test_content_hash_follows_content_not_line_numbers():
    record = {"id": "a", "messages": _chat("q", "a"), "label": None, "source": "gold", "parent_id": None, "line": 1}
    moved = record | {"line": 99}
    changed = record | {"messages": _chat("q", "another answer")}
    assert content_hash([record]) == content_hash([moved])
    assert content_hash([record]) != content_hash([changed])
    assert content_hash([record]) != content_hash([record | {"label": "x"}])
    assert content_hash([record, changed]) != content_hash([changed, record])


def test_ids_and_provenance_given_in_the_rows_are_kept(tmp_path):
    rows = [
        {"id": "q-7", "prompt": "p1", "completion": "c1", "source": "paraphrase", "parent_id": "q-1"},
        {"id": 12, "prompt": "p2", "completion": "c2", "source": "", "parent_id": ""},
        {"id": "", "prompt": "p3", "completion": "c3", "source": "self_distilled", "parent_id": 5},
    ]
    from_jsonl = load_records(write_jsonl_file(rows, tmp_path)[0]).records
    from_csv = load_records(write_csv(rows, tmp_path)[0]).records
    provenance = lambda records: [(r["id"], r["source"], r["parent_id"]) for r in records]  # noqa: E731
    # JSON keeps the difference between an empty string and a null; an empty CSV cell is a missing value.
    assert provenance(from_jsonl) == [("q-7", "paraphrase", "q-1"), ("12", "gold", ""), ("data-3", "self_distilled", "5")]
    assert provenance(from_csv) == [("q-7", "paraphrase", "q-1"), ("12", "gold", None), ("data-3", "self_distilled", "5")]


def test_empty_csv_cells_mean_missing_values(tmp_path):
    rows = [
        {"id": "", "messages": ROWS["messages"][0]["messages"], "label": "", "parent_id": ""},
        {"id": "m2", "messages": ROWS["messages"][1]["messages"], "label": "price", "parent_id": "m0"},
    ]
    records = load_records(write_csv(rows, tmp_path)[0]).records
    assert [(r["id"], r["label"], r["parent_id"]) for r in records] == [("data-1", None, None), ("m2", "price", "m0")]


def test_ids_count_rows_not_lines(tmp_path):
    path = tmp_path / "faq.jsonl"
    path.write_text("\n" + json.dumps(ROWS["prompt_completion"][0]) + "\n\n\n" + json.dumps(ROWS["prompt_completion"][1]) + "\n")
    records = load_records(path).records
    assert [(r["id"], r["line"]) for r in records] == [("faq-1", 2), ("faq-2", 5)]


def test_system_prompt_is_added_only_where_missing(tmp_path):
    path, _ = write_jsonl_file(ROWS["messages"], tmp_path)
    records = load_records(path, system_prompt="Be brief.").records
    assert records[0]["messages"] == ROWS["messages"][0]["messages"]  # already has a system message
    for record, row in zip(records[1:], ROWS["messages"][1:]):
        assert record["messages"] == [{"role": "system", "content": "Be brief."}, *row["messages"]]


def test_alpaca_input_is_optional(tmp_path):
    path = write_lines(
        tmp_path / "a.jsonl",
        [
            json.dumps({"instruction": "Say hi.", "output": "Hi"}),
            json.dumps({"instruction": "Say bye.", "input": "   ", "output": "Bye"}),
            json.dumps({"instruction": "Say yes.", "input": None, "output": "Yes"}),
        ],
    )
    records = load_records(path).records
    assert [r["messages"][0]["content"] for r in records] == ["Say hi.", "Say bye.", "Say yes."]


def test_numeric_labels_become_text(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps({"text": "good", "label": 1}), json.dumps({"text": "bad", "label": 0})])
    records = load_records(path).records
    assert [r["label"] for r in records] == ["1", "0"]
    assert [r["messages"][-1]["content"] for r in records] == ["1", "0"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_utf8_bom_is_ignored_in_json(tmp_path, suffix):
    if suffix == ".json":
        body = json.dumps(ROWS["prompt_completion"])
    else:
        body = "\n".join(json.dumps(r) for r in ROWS["prompt_completion"])
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    result = load_records(path)
    assert result.rejects == []
    assert len(result.records) == 3
    assert result.records[0]["messages"][0]["content"] == "When are you open?"


def test_utf8_bom_is_ignored_in_csv(tmp_path):
    path, _ = write_csv(ROWS["text_label"], tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    result = load_records(path)
    assert result.format == "text_label"  # the header's first column is `text`, not `\ufefftext`
    assert len(result.records) == 3 and result.rejects == []


def test_windows_line_endings(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\r\n" for r in ROWS["alpaca"]))
    result = load_records(path)
    assert len(result.records) == 3 and result.rejects == []


# ----------------------------------------------------------------------------------------------------------------
# Files unusable as a whole: DataError naming the file, the line where there is one, and the problem


def _data_error(spec, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_records(spec, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.csv"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("")
    msg = _data_error(path)
    assert str(path) in msg and "empty" in msg and "fix:" in msg


def test_whitespace_only_file(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n   \n\t\n")
    assert "empty" in _data_error(path)


def test_empty_json_array(tmp_path):
    path = tmp_path / "none.json"
    path.write_text("[]")
    msg = _data_error(path)
    assert str(path) in msg and "no rows found" in msg


def test_header_only_csv(tmp_path):
    path = write_lines(tmp_path / "header.csv", ["prompt,completion", "", " , "])
    msg = _data_error(path)
    assert str(path) in msg and "no rows found" in msg and "header alone" in msg


def test_csv_with_unknown_columns(tmp_path):
    path = write_lines(tmp_path / "qa.csv", ["question,answer", "Open?,Yes", "Closed?,No"])
    msg = _data_error(path)
    assert f"{path}, line 2:" in msg
    assert "none of its 2 rows is usable" in msg
    assert "unrecognised row shape" in msg and "'question'" in msg
    assert "`prompt`+`completion`" in msg  # says which shapes would work


def test_every_row_bad_names_the_first_bad_line(tmp_path):
    last_turn_user = {"messages": [{"role": "user", "content": "Hi"}]}
    path = write_lines(tmp_path / "bad.jsonl", ["", json.dumps(last_turn_user), json.dumps({"messages": "Hi"})])
    msg = _data_error(path)
    assert f"{path}, line 2:" in msg
    assert "none of its 2 rows is usable" in msg and "the last message is the user's" in msg
    assert "`instruction`+`output`" not in msg  # the row shape was fine; no misleading shape hint


def test_truncated_json_array(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c", "compl')
    msg = _data_error(path)
    assert f"{path}, line 3:" in msg and "not valid JSON" in msg and "fix:" in msg


def test_json_array_error_line_counts_leading_blank_lines(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('\n\n[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c" "completion": "d"}\n]\n')
    assert f"{path}, line 5:" in _data_error(path)


def test_json_array_with_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n{"prompt": "caf\xe9", "completion": "b"}\n]')
    msg = _data_error(path)
    assert f"{path}, line 2:" in msg and "UTF-8" in msg


def test_csv_with_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt,completion\nHi,Hello\ncaf\xe9,ok\n")
    msg = _data_error(path)
    assert f"{path}, line 3:" in msg and "not valid UTF-8" in msg and "re-save" in msg


def test_csv_with_duplicate_columns(tmp_path):
    path = write_lines(tmp_path / "dup.csv", ["prompt,completion,prompt", "a,b,c"])
    msg = _data_error(path)
    assert f"{path}, line 1:" in msg and "duplicate column" in msg


def test_csv_syntax_error(tmp_path):
    path = write_lines(tmp_path / "quotes.csv", ["prompt,completion", "a,b", 'c,"d"e'])
    msg = _data_error(path)
    assert f"{path}, line 3:" in msg and "CSV syntax error" in msg and "quote" in msg


def test_damaged_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    msg = _data_error(path)
    assert str(path) in msg and "not a readable Parquet file" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "train.jsonl"
    msg = _data_error(path)
    assert str(path) in msg and "no such file or folder" in msg


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    msg = _data_error(folder)
    assert str(folder) in msg and "could not load it as a Hugging Face dataset" in msg and "save_to_disk" in msg


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello")
    msg = _data_error(path)
    assert str(path) in msg and "unsupported file type .txt" in msg and ".jsonl" in msg


def test_unknown_format_name(tmp_path):
    path, _ = write_jsonl_file(ROWS["messages"], tmp_path)
    msg = _data_error(path, fmt="sharegpt")
    assert str(path) in msg and "unknown data format 'sharegpt'" in msg
    assert all(fmt in msg for fmt in FORMATS)


def test_explicit_format_that_does_not_match_the_rows(tmp_path):
    path, _ = write_jsonl_file(ROWS["prompt_completion"], tmp_path)
    msg = _data_error(path, fmt="alpaca")
    assert f"{path}, line 1:" in msg and "row is in prompt_completion format but the file is alpaca" in msg


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1 to fail fast")
def test_unreachable_hub_id():
    msg = _data_error("nobody-here/no-such-dataset:train")
    assert "nobody-here/no-such-dataset:train" in msg and "Hugging Face dataset" in msg


# ----------------------------------------------------------------------------------------------------------------
# Single bad rows: a Reject with file, line and reason; the good rows around it still load

GOOD_MESSAGES = json.dumps({"messages": _chat("Hello?", "Hi, how can I help?")})
GOOD_PROMPT = json.dumps({"prompt": "Hello?", "completion": "Hi, how can I help?"})


def _msgs(*turns) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


BAD_ROWS = {
    # name: (good row of the file, bad line, words the reason must contain)
    "truncated_json": (GOOD_PROMPT, '{"prompt": "a", "completion": ', ["not valid JSON", "column"]),
    "list_not_object": (GOOD_PROMPT, '["a", "b"]', ["expected an object", "got list"]),
    "number_not_object": (GOOD_PROMPT, "42", ["expected an object", "got int"]),
    "string_not_object": (GOOD_PROMPT, '"just text"', ["expected an object", "got str"]),
    # Once the file's format is known, a row of no known shape is told what that format needs.
    "unknown_keys": (GOOD_PROMPT, json.dumps({"question": "a", "answer": "b"}), ["`prompt` is missing or null"]),
    "mixed_formats": (
        GOOD_PROMPT,
        json.dumps({"instruction": "a", "output": "b"}),
        ["row is in alpaca format but the file is prompt_completion", "detected from line 1"],
    ),
    "unknown_role": (GOOD_MESSAGES, _msgs(("bot", "hi"), ("assistant", "ok")), ["messages[0].role is 'bot'", "user"]),
    "role_is_missing": (GOOD_MESSAGES, json.dumps({"messages": [{"content": "hi"}]}), ["messages[0].role is None"]),
    "last_turn_not_assistant": (
        GOOD_MESSAGES,
        _msgs(("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")),
        ["last message is the user's", "assistant's answer"],
    ),
    "no_assistant_turn": (GOOD_MESSAGES, _msgs(("system", "Be nice.")), ["last message is the system's"]),
    "empty_content": (GOOD_MESSAGES, _msgs(("user", "Hi"), ("assistant", "")), ["messages[1].content is empty"]),
    "whitespace_content": (GOOD_MESSAGES, _msgs(("user", " \n\t"), ("assistant", "ok")), ["messages[0].content is empty"]),
    "content_is_int": (
        GOOD_MESSAGES,
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 42}]}),
        ["messages[1].content must be a string, got int"],
    ),
    "messages_is_string": (GOOD_MESSAGES, json.dumps({"messages": "user: hi"}), ["`messages` must be a list", "got str"]),
    "messages_is_null": (GOOD_MESSAGES, json.dumps({"messages": None}), ["`messages` is missing or null"]),
    "messages_empty": (GOOD_MESSAGES, json.dumps({"messages": []}), ["`messages` is empty"]),
    "message_not_object": (GOOD_MESSAGES, json.dumps({"messages": ["hi", "ho"]}), ["messages[0] must be an object"]),
    "completion_null": (GOOD_PROMPT, json.dumps({"prompt": "a", "completion": None}), ["`completion` is missing or null"]),
    "completion_missing": (GOOD_PROMPT, json.dumps({"prompt": "a"}), ["`completion` is missing or null"]),
    "completion_blank": (GOOD_PROMPT, json.dumps({"prompt": "a", "completion": "  "}), ["`completion` is empty"]),
    "label_blank": (
        json.dumps({"text": "good", "label": "pos"}),
        json.dumps({"text": "meh", "label": " "}),
        ["`label` is empty"],
    ),
    "prompt_is_object": (GOOD_PROMPT, json.dumps({"prompt": {"q": 1}, "completion": "b"}), ["`prompt` must be text, got dict"]),
    "prompt_is_bool": (GOOD_PROMPT, json.dumps({"prompt": True, "completion": "b"}), ["`prompt` must be text, got bool"]),
    "unknown_source": (
        GOOD_PROMPT,
        json.dumps({"prompt": "a", "completion": "b", "source": "synthetic"}),
        ["`source` is 'synthetic'", "gold"],
    ),
    "id_is_list": (GOOD_PROMPT, json.dumps({"id": [1], "prompt": "a", "completion": "b"}), ["`id` must be a string or integer"]),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_row_is_rejected_and_good_rows_load(tmp_path, case):
    good, bad, words = BAD_ROWS[case]
    path = write_lines(tmp_path / "rows.jsonl", [good, bad, good])

    result = load_records(path)

    assert [r["line"] for r in result.records] == [1, 3]
    assert result.rows_in == 3 == len(result.records) + len(result.rejects)
    [reject] = result.rejects
    assert (reject.file, reject.line) == (str(path), 2)
    for word in words:
        assert word in reject.reason
    json.dumps(reject.to_dict())  # quarantine files are JSON
    assert reject.to_dict()["reasons"] == [reject.reason]


def test_role_order_is_left_to_the_validate_stage(tmp_path):
    # Role order is a named check of the validate stage, which explains it in quarantine; the loader keeps such a
    # row as written as long as it ends with an assistant answer.
    out_of_order = _msgs(("assistant", "Hello"), ("user", "Hi"), ("user", "Again"), ("assistant", "ok"))
    path = write_lines(tmp_path / "rows.jsonl", [GOOD_MESSAGES, out_of_order])
    result = load_records(path)
    assert result.rejects == []
    assert result.records[1]["messages"] == json.loads(out_of_order)["messages"]


def test_bad_row_with_explicit_format(tmp_path):
    path = write_lines(tmp_path / "rows.jsonl", [GOOD_PROMPT, "[1, 2]", json.dumps({"prompt": "a"}), GOOD_PROMPT])
    result = load_records(path, fmt="prompt_completion")
    assert [(r.line, r.reason) for r in result.rejects] == [
        (2, "expected an object with named fields, got list"),
        (3, "`completion` is missing or null"),
    ]
    assert len(result.records) == 2


def test_invalid_utf8_line_in_jsonl(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(GOOD_PROMPT.encode() + b'\n{"prompt": "caf\xe9", "completion": "b"}\n' + GOOD_PROMPT.encode() + b"\n")
    result = load_records(path)
    [reject] = result.rejects
    assert (reject.file, reject.line) == (str(path), 2) and "invalid UTF-8" in reject.reason
    assert len(result.records) == 2
    json.dumps(reject.to_dict())


def test_jsonl_whose_first_line_is_an_array(tmp_path):
    path = write_lines(tmp_path / "rows.jsonl", ['["a", "b"]', GOOD_PROMPT, GOOD_PROMPT])
    result = load_records(path)
    assert [(r.line, r.reason) for r in result.rejects] == [(1, "expected an object with named fields, got list")]
    assert [r["line"] for r in result.records] == [2, 3]


def test_first_bad_rows_do_not_decide_the_format(tmp_path):
    unknown = json.dumps({"question": "a", "answer": "b"})
    path = write_lines(tmp_path / "rows.jsonl", [unknown, "not json", GOOD_MESSAGES, GOOD_PROMPT])
    result = load_records(path)
    assert result.format == "messages"
    assert [r.line for r in result.rejects] == [1, 2, 4]
    assert "unrecognised row shape (keys: ['answer', 'question'])" in result.rejects[0].reason
    assert "`messages`, or `prompt`+`completion`" in result.rejects[0].reason
    assert "not valid JSON" in result.rejects[1].reason
    assert "detected from line 3" in result.rejects[2].reason


def test_bad_rows_in_csv(tmp_path):
    path = write_lines(
        tmp_path / "rows.csv",
        [
            "id,messages",
            'a,"[{""role"": ""user"", ""content"": ""Hi""}, {""role"": ""assistant"", ""content"": ""Hello""}]"',
            "b,user: hi",
            "c,",
            "d,[],extra",
            'e,"[{""role"": ""user"", ""content"": ""Hi""}]"',
            'f,"[{""role"": ""user"", ""content"": ""Yo""}, {""role"": ""assistant"", ""content"": ""Hey""}]"',
        ],
    )
    result = load_records(path)
    assert [r["id"] for r in result.records] == ["a", "f"]
    assert [r["line"] for r in result.records] == [2, 7]
    reasons = {r.line: r.reason for r in result.rejects}
    assert set(reasons) == {3, 4, 5, 6}
    assert "`messages` column is not a JSON list" in reasons[3]
    assert "`messages` is missing or null" in reasons[4]
    assert "3 fields but the header has 2" in reasons[5]
    assert "assistant's answer" in reasons[6]
    assert all(r.file == str(path) for r in result.rejects)
    assert result.rows_in == 6


def test_null_cells_in_parquet(tmp_path):
    import pandas as pd

    path = tmp_path / "labels.parquet"
    pd.DataFrame({"text": ["good", "bad", None], "label": ["pos", None, "neg"]}).to_parquet(path)
    result = load_records(path)
    assert [r["label"] for r in result.records] == ["pos"]
    assert [(r.line, r.reason) for r in result.rejects] == [(2, "`label` is missing or null"), (3, "`text` is missing or null")]
    json.dumps([r.to_dict() for r in result.rejects])


def test_reject_with_unserialisable_row_is_still_json():
    reject = Reject("f.parquet", 4, {"when": object()}, "bad")
    row = reject.to_dict()
    assert isinstance(row["row"], str) and row["file"] == "f.parquet" and row["line"] == 4
    json.dumps(row)


# ----------------------------------------------------------------------------------------------------------------
# Train/eval split


def _records(n: int, prefix: str = "r") -> list[dict]:
    return [{"id": f"{prefix}{i}", "messages": _chat(f"q{i}", f"a{i}")} for i in range(n)]


def _ids(rows: list[dict]) -> list[str]:
    return [r["id"] for r in rows]


def test_split_is_disjoint_and_covers_every_row():
    records = _records(40)
    train, evals = split_train_eval(records, 0.25, seed=0)
    assert len(evals) == 10 and len(train) == 30
    assert not set(_ids(train)) & set(_ids(evals))
    assert sorted(_ids(train) + _ids(evals)) == sorted(_ids(records))


def test_split_is_deterministic_and_keeps_input_order():
    records = _records(50)
    first = split_train_eval(records, 0.2, seed=7)
    assert split_train_eval(records, 0.2, seed=7) == first
    train, evals = first
    position = {r["id"]: i for i, r in enumerate(records)}
    assert [position[r["id"]] for r in train] == sorted(position[r["id"]] for r in train)
    assert [position[r["id"]] for r in evals] == sorted(position[r["id"]] for r in evals)


def test_split_does_not_depend_on_input_order():
    records = _records(60)
    shuffled = records[:]
    random.Random(3).shuffle(shuffled)
    train_a, eval_a = split_train_eval(records, 0.15, seed=1)
    train_b, eval_b = split_train_eval(shuffled, 0.15, seed=1)
    assert set(_ids(eval_a)) == set(_ids(eval_b))
    assert set(_ids(train_a)) == set(_ids(train_b))


def test_split_keeps_augmented_rows_with_their_parent():
    """Rewrites and paraphrases (`parent_id`) land on their parent's side; rows without one split as before."""
    import hashlib

    records = _records(60)
    train, evals = split_train_eval(records, 0.2, seed=5)  # no parents: the seeded hash of each id decides
    ranked = sorted(records, key=lambda r: hashlib.sha256(f"5:{r['id']}".encode()).hexdigest())
    assert set(_ids(evals)) == set(_ids(ranked[:12]))

    derived = [{**r, "id": f"{r['id']}#pp", "parent_id": r["id"]} for r in records[::2]]
    replaced = [{**r, "id": f"{r['id']}#sd", "parent_id": r["id"]} for r in records[1::4]]  # their gold rows leave
    kept = [r for r in records if r["id"] not in {x["parent_id"] for x in replaced}]
    train, evals = split_train_eval(kept + derived + replaced, 0.2, seed=5)
    side = {r["id"]: "train" for r in train} | {r["id"]: "eval" for r in evals}
    family = {}
    for r in kept + derived + replaced:
        family.setdefault(r.get("parent_id") or r["id"], set()).add(side[r["id"]])
    assert all(len(sides) == 1 for sides in family.values())  # no family split across train and eval
    assert 18 <= len(evals) <= 19 and len(train) + len(evals) == 90
    assert any(r in evals for r in derived) and any(r in train for r in derived)


def test_split_holds_out_a_row_even_when_one_family_holds_them_all():
    records = [{"id": "root", "messages": _chat("q", "a")}]
    records += [{"id": f"p{i}", "parent_id": "root", "messages": _chat(f"q{i}", "a")} for i in range(9)]
    train, evals = split_train_eval(records, 0.2, seed=0)
    assert len(evals) == 2 and len(train) == 8


def test_split_seed_changes_the_eval_rows():
    records = _records(60)
    evals = {seed: set(_ids(split_train_eval(records, 0.2, seed)[1])) for seed in range(3)}
    assert len({frozenset(v) for v in evals.values()}) == 3
    assert all(len(v) == 12 for v in evals.values())


@pytest.mark.parametrize(
    "n, fraction, n_eval",
    [(0, 0.15, 0), (1, 0.15, 0), (2, 0.15, 1), (3, 0.15, 1), (10, 0.15, 2), (20, 0.15, 3), (101, 0.15, 15), (100, 0.5, 50)],
)
def test_split_eval_size_follows_the_fraction(n, fraction, n_eval):
    train, evals = split_train_eval(_records(n), fraction, seed=0)
    assert len(evals) == n_eval
    assert len(train) == n - n_eval


def test_split_always_leaves_a_training_row():
    train, evals = split_train_eval(_records(2), 0.9, seed=0)
    assert len(train) == 1 and len(evals) == 1
    train, evals = split_train_eval(_records(5), 0.95, seed=0)
    assert len(train) == 1 and len(evals) == 4


def test_split_is_the_same_for_the_same_rows_in_any_file_type(tmp_path):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(20)]
    splits = set()
    for file_type, writer in WRITERS.items():
        folder = tmp_path / file_type
        folder.mkdir()
        records = load_records(writer(rows, folder)[0]).records
        splits.add(tuple(_ids(split_train_eval(records, 0.2, seed=0)[1])))
    assert len(splits) == 1


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def test_prompt_and_response_splits_off_the_last_answer():
    messages = ROWS["messages"][2]["messages"]
    prompt, response = prompt_and_response({"id": "x", "messages": messages})
    assert prompt == messages[:-1]
    assert response == "Yes, from 35 € a day."


def test_prompt_and_response_needs_a_final_assistant_turn():
    with pytest.raises(ValueError, match="row q-3: the last message must be the assistant's answer"):
        prompt_and_response({"id": "q-3", "messages": _chat("a", "b")[:1]})
    with pytest.raises(ValueError, match="row q-4"):
        prompt_and_response({"id": "q-4", "messages": []})


def test_jsonl_round_trip(tmp_path):
    rows = [
        {"id": "1", "text": "café ☕ — 東京", "nested": {"list": [1, 2.5, None, True]}},
        {"id": "2", "text": 'quotes " and \\ backslashes\nand newlines'},
    ]
    path = write_jsonl(tmp_path / "deep" / "er" / "rows.jsonl", rows)
    assert path == tmp_path / "deep" / "er" / "rows.jsonl"
    assert read_jsonl(path) == rows
    text = path.read_text(encoding="utf-8")
    assert "café ☕ — 東京" in text  # readable UTF-8, not \\u escapes
    assert len(text.splitlines()) == 2


def test_written_records_load_back_to_the_same_content(tmp_path):
    source, _ = write_csv(ROWS["alpaca"], tmp_path)
    records = load_records(source, system_prompt="Be helpful.").records
    copy = load_records(write_jsonl(tmp_path / "canonical.jsonl", records))
    assert copy.format == "messages"
    assert content_hash(copy.records) == content_hash(records)


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
