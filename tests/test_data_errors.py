"""Tests of the data loader on malformed input: files unusable as a whole (DataError naming the file, the line and
the fix) and single bad rows (a Reject with file, line and reason, the good rows around it still loading)."""

from __future__ import annotations

import json
import os

import pytest
from data_helpers import ROWS, chat, write_jsonl_file, write_lines

from tasks.common.records import FORMATS, DataError, Reject, load_records

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

GOOD_MESSAGES = json.dumps({"messages": chat("Hello?", "Hi, how can I help?")})
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
