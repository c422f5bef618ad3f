"""Tests of the data loader: every row shape from every container, and the record helpers (answers, JSONL)."""

from __future__ import annotations

import json

import pytest
from data_helpers import ROWS, WRITERS, chat, write_csv, write_jsonl_file, write_lines

from tasks.common.records import (
    FORMATS,
    content_hash,
    load_records,
    prompt_and_response,
    read_jsonl,
    write_jsonl,
)

# The canonical conversation each row of ROWS must become.
EXPECTED_MESSAGES = {
    "messages": [r["messages"] for r in ROWS["messages"]],
    "prompt_completion": [chat(r["prompt"], r["completion"]) for r in ROWS["prompt_completion"]],
    "alpaca": [
        chat("Translate to French.\n\nGood morning", "Bonjour"),
        chat("Name a primary colour.", "Red"),
        chat("Summarise, in one word.\n\nThe bike, sadly, was stolen.", "Theft"),
    ],
    "text_label": [chat(r["text"], r["label"]) for r in ROWS["text_label"]],
}
EXPECTED_LABELS = {fmt: [None] * 3 for fmt in FORMATS} | {"text_label": ["positive", "negative", "question"]}
RECORD_KEYS = {"id", "messages", "label", "source", "parent_id", "line"}


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
    record = {"id": "a", "messages": chat("q", "a"), "label": None, "source": "gold", "parent_id": None, "line": 1}
    moved = record | {"line": 99}
    changed = record | {"messages": chat("q", "another answer")}
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
# Helpers


def test_prompt_and_response_splits_off_the_last_answer():
    messages = ROWS["messages"][2]["messages"]
    prompt, response = prompt_and_response({"id": "x", "messages": messages})
    assert prompt == messages[:-1]
    assert response == "Yes, from 35 € a day."


def test_prompt_and_response_needs_a_final_assistant_turn():
    with pytest.raises(ValueError, match="row q-3: the last message must be the assistant's answer"):
        prompt_and_response({"id": "q-3", "messages": chat("a", "b")[:1]})
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
