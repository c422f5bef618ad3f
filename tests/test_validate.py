"""Validate stage: checks, quarantine with reasons, split, accounting and fatal conditions."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from flows.config import FewtuneConfig
from tasks.data import LoadResult, load_records, read_jsonl
from tasks.validate import ValidationFailed, ValidationResult, validate_dataset


def chat(i: int, *, user: str | None = None, answer: str | None = None, system: str | None = None) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [
        {"role": "user", "content": user if user is not None else f"Question number {i}?"},
        {"role": "assistant", "content": answer if answer is not None else f"Answer number {i}."},
    ]
    return {"id": f"r{i}", "messages": messages}


def write_rows(path: Path, rows: list[Any]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load(tmp_path: Path, name: str, rows: list[Any]) -> LoadResult:
    return load_records(write_rows(tmp_path / name, rows))


def from_records(path: str, records: list[dict[str, Any]]) -> LoadResult:
    """Records built in Python, for checks the loader would already catch in a file."""
    return LoadResult(path=path, format="messages", records=[{**r, "line": i} for i, r in enumerate(records, 1)])


def make_cfg(**validate: Any) -> FewtuneConfig:
    cfg = FewtuneConfig(data={"train": "x.jsonl"})
    cfg.data.max_bad_fraction = 1.0  # most tests look at single rows; the fatal tests set it back
    for key, value in validate.items():
        setattr(cfg.validate_, key, value)
    return cfg


def clean_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [chat(i) for i in range(start, start + n)]


def quarantined_by_line(result: ValidationResult, file: Path | str) -> dict[int, list[str]]:
    return {e["line"]: e["reasons"] for e in result.quarantined if e["file"] == str(file)}


def assert_accounting(result: ValidationResult) -> None:
    for f in result.counts["files"].values():
        assert f["rows_in"] == f["rows_kept"] + f["rows_quarantined"]
    report = json.loads(result.report_path.read_text())
    assert report["files"] == result.counts["files"]
    assert len(read_jsonl(result.quarantine_path)) == len(result.quarantined)


def test_clean_data_is_all_kept(tmp_path: Path) -> None:
    train = load(tmp_path, "train.jsonl", clean_rows(10))
    evals = load(tmp_path, "eval.jsonl", clean_rows(3, start=100))
    result = validate_dataset(train, evals, make_cfg(), tmp_path / "out")

    assert [r["id"] for r in result.train] == [f"r{i}" for i in range(10)]
    assert [r["id"] for r in result.eval] == ["r100", "r101", "r102"]
    assert result.quarantined == []
    assert read_jsonl(result.train_path) == result.train
    assert read_jsonl(result.eval_path) == result.eval
    report = json.loads(result.report_path.read_text())
    assert report["usable"] is True
    assert report["great_expectations"]["success"] is True
    assert {s["suite"] for s in report["great_expectations"]["suites"]} == {"rows-train", "rows-eval", "leakage"}
    assert all(c["quarantined"] == 0 for c in report["checks"].values())
    assert result.summary()["files"]["train"] == {
        "path": train.path, "rows_in": 10, "rows_kept": 10, "rows_quarantined": 0
    }
    assert_accounting(result)


def test_exact_duplicates_keep_the_first_copy(tmp_path: Path) -> None:
    rows = clean_rows(10)
    copy = {**chat(2), "id": "copy-a"}
    copy_padded = {"id": "copy-b", "messages": [{"role": "user", "content": " Question number 2? "},
                                                {"role": "assistant", "content": "Answer number 2.\n"}]}
    path = write_rows(tmp_path / "train.jsonl", [*rows, copy, copy_padded])
    result = validate_dataset(load_records(path), None, make_cfg(), tmp_path / "out")

    kept_ids = {r["id"] for r in [*result.train, *result.eval]}
    assert "r2" in kept_ids and not kept_ids & {"copy-a", "copy-b"}
    bad = quarantined_by_line(result, path)
    assert sorted(bad) == [11, 12]
    for reasons in bad.values():
        assert len(reasons) == 1 and reasons[0].startswith("exact_duplicate:")
        assert reasons[0].endswith("kept copy: line 3 (id r2)")
    assert result.counts["checks"]["exact_duplicate"] == {
        "description": result.counts["checks"]["exact_duplicate"]["description"], "flagged": 3, "quarantined": 2
    }
    assert_accounting(result)


def test_duplicate_ids_keep_the_first_usable_copy(tmp_path: Path) -> None:
    broken_first = {"id": "dup", "messages": [{"role": "assistant", "content": "Hello"}]}
    good_second = {**chat(50), "id": "dup"}
    good_third = {**chat(51), "id": "dup"}
    path = write_rows(tmp_path / "train.jsonl", [*clean_rows(10), broken_first, good_second, good_third])
    result = validate_dataset(load_records(path), None, make_cfg(), tmp_path / "out")

    bad = quarantined_by_line(result, path)
    assert sorted(bad) == [11, 13]
    assert [r.split(":")[0] for r in bad[11]] == ["role_order"]
    assert bad[13][0].startswith("unique_id:") and bad[13][0].endswith("kept copy: line 12 (id dup)")
    assert [r["line"] for r in [*result.train, *result.eval] if r["id"] == "dup"] == [12]


@pytest.mark.parametrize(
    "roles",
    [
        ["user", "user", "assistant"],
        ["assistant"],
        ["system", "assistant"],
        ["user", "assistant", "assistant"],
        ["system", "system", "user", "assistant"],
        ["user", "system", "assistant"],
    ],
)
def test_bad_role_order_is_quarantined(tmp_path: Path, roles: list[str]) -> None:
    bad_row = {"id": "bad", "messages": [{"role": r, "content": f"text {k}"} for k, r in enumerate(roles)]}
    path = write_rows(tmp_path / "train.jsonl", [*clean_rows(10), bad_row])
    result = validate_dataset(load_records(path), None, make_cfg(), tmp_path / "out")

    bad = quarantined_by_line(result, path)
    assert list(bad) == [11]
    (reason,) = bad[11]
    assert reason.startswith("role_order:") and ",".join(roles) in reason
    assert result.counts["checks"]["role_order"]["quarantined"] == 1
    assert_accounting(result)


def test_role_order_catches_rows_built_in_python(tmp_path: Path) -> None:
    # Rows that end with the user: the loader rejects them in files, the suite still catches them in records.
    ends_with_user = {"id": "bad", "messages": [{"role": "user", "content": "q"}]}
    train = from_records("mem:train", [*clean_rows(10), ends_with_user])
    result = validate_dataset(train, None, make_cfg(), tmp_path / "out")
    (entry,) = result.quarantined
    assert entry["id"] == "bad" and entry["line"] == 11 and entry["file"] == "mem:train"
    assert entry["reasons"] == [entry["reasons"][0]] and entry["reasons"][0].startswith("role_order: roles are user;")


def test_multi_turn_and_system_rows_pass_role_order(tmp_path: Path) -> None:
    multi = {"id": "multi", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hours?"},
        {"role": "assistant", "content": "9 to 5."},
    ]}
    path = write_rows(tmp_path / "train.jsonl", [*clean_rows(10), multi])
    result = validate_dataset(load_records(path), None, make_cfg(), tmp_path / "out")
    assert result.quarantined == []


def test_whitespace_only_content_is_quarantined(tmp_path: Path) -> None:
    train = from_records("mem:train", [*clean_rows(10), chat(90, answer="  \n\t "), chat(91, user="")])
    result = validate_dataset(train, None, make_cfg(), tmp_path / "out")

    bad = quarantined_by_line(result, "mem:train")
    assert sorted(bad) == [11, 12]
    assert bad[11] == [bad[11][0]] and bad[11][0].startswith("non_empty_content:")
    assert "messages[1] (assistant)" in bad[11][0]
    assert "messages[0] (user)" in bad[12][0]
    assert result.counts["checks"]["non_empty_content"]["quarantined"] == 2


def test_whitespace_only_content_in_a_file_is_quarantined_at_load(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "train.jsonl", [*clean_rows(10), chat(90, answer="  \n\t ")])
    result = validate_dataset(load_records(path), None, make_cfg(), tmp_path / "out")
    bad = quarantined_by_line(result, path)
    assert list(bad) == [11] and len(bad[11]) == 1 and "empty" in bad[11][0]


def test_over_long_content_is_quarantined(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "train.jsonl", [*clean_rows(10), chat(90, answer="x" * 61), chat(91, answer="y" * 60)])
    result = validate_dataset(load_records(path), None, make_cfg(max_chars=60), tmp_path / "out")

    bad = quarantined_by_line(result, path)
    assert list(bad) == [11]
    assert bad[11][0].startswith("max_length:")
    assert "61 characters" in bad[11][0] and "validate.max_chars=60" in bad[11][0]


def test_leaking_train_row_leaves_train_and_eval_stays_intact(tmp_path: Path) -> None:
    train_path = write_rows(tmp_path / "train.jsonl", clean_rows(10))
    leaking = chat(3, system="A different system prompt.")
    leaking["id"] = "e-leak"
    eval_path = write_rows(tmp_path / "eval.jsonl", [leaking, *clean_rows(2, start=100)])
    result = validate_dataset(load_records(train_path), load_records(eval_path), make_cfg(), tmp_path / "out")

    assert [r["id"] for r in result.eval] == ["e-leak", "r100", "r101"]
    assert "r3" not in {r["id"] for r in result.train}
    entry = next(e for e in result.quarantined if e["id"] == "r3")
    assert entry["split"] == "train" and entry["file"] == str(train_path) and entry["line"] == 4
    assert entry["reasons"][0].startswith("train_eval_leakage:") and "line 1 (id e-leak)" in entry["reasons"][0]
    assert result.counts["checks"]["train_eval_leakage"]["quarantined"] == 1
    assert_accounting(result)


def test_leakage_is_checked_after_the_split_too(tmp_path: Path) -> None:
    # Same prompt and answer under two system prompts: not exact duplicates, but one copy must not train
    # while the other is evaluated.
    rows = [*clean_rows(30), *(chat(i, system="Other system prompt.") | {"id": f"s{i}"} for i in range(30))]
    result = validate_dataset(load(tmp_path, "train.jsonl", rows), None, make_cfg(), tmp_path / "out")

    def pair(r: dict[str, Any]) -> tuple[str, str]:
        return r["messages"][-2]["content"], r["messages"][-1]["content"]

    assert not {pair(r) for r in result.train} & {pair(r) for r in result.eval}
    leaked = [e for e in result.quarantined if e["reasons"][0].startswith("train_eval_leakage:")]
    assert leaked and len(result.train) + len(result.eval) + len(leaked) == 60
    assert_accounting(result)


def test_loader_rejects_are_quarantined_with_file_and_line(tmp_path: Path) -> None:
    rows = [*clean_rows(10), "{not json", {"foo": "bar", "id": 7}, {"prompt": "p", "completion": "c"}]
    path = write_rows(tmp_path / "train.jsonl", rows)
    result = validate_dataset(load_records(path), None, make_cfg(), tmp_path / "out")

    bad = quarantined_by_line(result, path)
    assert sorted(bad) == [11, 12, 13]
    assert all(reasons[0].startswith("load:") for reasons in bad.values())
    assert "not valid JSON" in bad[11][0]
    entries = {e["line"]: e for e in read_jsonl(result.quarantine_path)}
    assert entries[11]["row"] == "{not json"
    assert entries[12]["row"] == {"foo": "bar", "id": 7} and entries[12]["id"] == "7"
    assert entries[13]["split"] == "train" and entries[13]["file"] == str(path)
    assert result.counts["checks"]["load"]["quarantined"] == 3
    assert_accounting(result)


def test_accounting_holds_for_a_messy_pair_of_files(tmp_path: Path) -> None:
    train_rows = [
        *clean_rows(20), chat(2), "oops", chat(61, answer="z" * 500),
        {"id": "r0", "messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        {"id": "x", "messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "a"},
                                 {"role": "assistant", "content": "b"}]},
    ]
    eval_rows = [chat(4), chat(200), chat(200) | {"id": "r201"}, "["]
    train = load(tmp_path, "train.jsonl", train_rows)
    train.records.append(chat(62, answer="  ") | {"line": 99})  # caught by the suite, not the loader
    evals = load(tmp_path, "eval.jsonl", eval_rows)
    result = validate_dataset(train, evals, make_cfg(max_chars=100), tmp_path / "out")

    files = result.counts["files"]
    assert files["train"]["rows_in"] == len(train_rows) + 1 and files["eval"]["rows_in"] == len(eval_rows)
    assert files["train"]["rows_kept"] == len(result.train) and files["eval"]["rows_kept"] == len(result.eval)
    assert [r["id"] for r in result.eval] == ["r4", "r200"]
    assert "r4" not in {r["id"] for r in result.train}  # leaked into eval
    assert_accounting(result)
    summary = result.summary()
    assert summary["quarantined"] == len(result.quarantined) == 9
    assert summary["failed_checks"] == {
        "load": 2, "unique_id": 2, "role_order": 1, "non_empty_content": 1, "max_length": 1,
        "exact_duplicate": 2, "train_eval_leakage": 1,
    }


def test_too_few_training_rows_is_fatal(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "train.jsonl", [*clean_rows(5), chat(9, answer=" ")])
    evals = load(tmp_path, "eval.jsonl", clean_rows(3, start=100))
    with pytest.raises(ValidationFailed) as info:
        validate_dataset(load_records(path), evals, make_cfg(), tmp_path / "out")
    message = str(info.value)
    assert f"{path}: 5 usable training rows, fewer than validate.min_rows=8" in message
    assert "fix:" in message and "quarantine.jsonl" in message
    # The outputs are written before the stage stops, so the user can inspect them.
    report = json.loads(info.value.report_path.read_text())
    assert report["usable"] is False and report["problems"] == info.value.problems
    assert len(read_jsonl(info.value.quarantine_path)) == 1


def test_too_few_eval_rows_is_fatal(tmp_path: Path) -> None:
    train = load(tmp_path, "train.jsonl", clean_rows(10))
    eval_path = write_rows(tmp_path / "eval.jsonl", [chat(100), chat(101, answer="")])
    expected = r"eval\.jsonl: 1 usable eval rows, fewer than validate\.min_eval_rows=2"
    with pytest.raises(ValidationFailed, match=expected):
        validate_dataset(train, load_records(eval_path), make_cfg(), tmp_path / "out")


def test_too_small_split_is_fatal_and_names_the_fix(tmp_path: Path) -> None:
    train = load(tmp_path, "train.jsonl", clean_rows(10))
    with pytest.raises(ValidationFailed) as info:
        validate_dataset(train, None, make_cfg(min_eval_rows=5), tmp_path / "out")
    message = str(info.value)
    assert "train.jsonl: the held-out split has 2 eval rows" in message
    assert "data.eval_fraction" in message and "data.eval" in message


def test_too_many_quarantined_rows_is_fatal(tmp_path: Path) -> None:
    bad = [
        {"id": f"b{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "user", "content": "more"},
                                     {"role": "assistant", "content": "a"}]}
        for i in range(3)
    ]
    path = write_rows(tmp_path / "train.jsonl", [*clean_rows(10), *bad, "broken"])
    cfg = make_cfg()
    cfg.data.max_bad_fraction = 0.2
    with pytest.raises(ValidationFailed) as info:
        validate_dataset(load_records(path), None, cfg, tmp_path / "out")
    message = str(info.value)
    assert f"{path}: 4 of 14 rows (29%) are quarantined, above data.max_bad_fraction=0.2" in message
    assert "role_order (3), load (1)" in message and "fix:" in message

    cfg.data.max_bad_fraction = 0.3
    result = validate_dataset(load_records(path), None, cfg, tmp_path / "out")
    assert len(result.quarantined) == 4


def test_split_without_eval_file_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    rows = clean_rows(40)
    first = validate_dataset(load(tmp_path, "a.jsonl", rows), None, make_cfg(), tmp_path / "a")
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    again = validate_dataset(load(tmp_path, "b.jsonl", shuffled), None, make_cfg(), tmp_path / "b")

    train_ids, eval_ids = {r["id"] for r in first.train}, {r["id"] for r in first.eval}
    assert len(eval_ids) == 6  # round(40 * 0.15)
    assert not train_ids & eval_ids and train_ids | eval_ids == {r["id"] for r in rows}
    assert eval_ids == {r["id"] for r in again.eval}
    assert first.counts["eval_source"] == "split"
    assert first.counts["files"]["train"]["kept_as_eval"] == 6
    assert_accounting(first)


def test_split_is_made_after_quarantine(tmp_path: Path) -> None:
    bad = [{"id": f"bad{i}", "messages": [{"role": "assistant", "content": f"a{i}"}]} for i in range(20)]
    rows = [*clean_rows(20), *bad]
    result = validate_dataset(load(tmp_path, "train.jsonl", rows), None, make_cfg(), tmp_path / "out")
    assert len(result.eval) == 3  # round(20 * 0.15): a share of the usable rows
    assert all(not r["id"].startswith("bad") for r in [*result.train, *result.eval])
    assert_accounting(result)
