"""Validate stage: checks and severities, quarantine with reasons, near-duplicates, leakage, token lengths,
fatal conditions, accounting, offline Data Docs, and the `fewtune validate` command."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from tasks.config import FewtuneConfig
from tasks.common.records import LoadResult, load_records, read_jsonl
from tasks.validate import ValidationFailed, ValidationResult, validate_dataset

REPO = Path(__file__).resolve().parent.parent


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
    # Most tests look at single rows in tiny files; the fatal tests set these back.
    cfg.data.max_bad_fraction = 1.0
    cfg.validate_.max_leak_fraction = 1.0
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
    assert report["usable"] is True and report["problems"] == []
    suites = {s["suite"]: s for s in report["great_expectations"]["suites"]}
    assert set(suites) == {"rows-train", "rows-eval", "near-duplicates", "leakage", "dataset", "files"}
    # Every row check passes; the only failed expectation is the size advice (a warning) on 10 rows.
    assert all(suites[name]["success"] for name in ("rows-train", "rows-eval", "near-duplicates", "leakage", "files"))
    assert [k for k, e in suites["dataset"]["expectations"].items() if not e["success"]] == ["dataset_size"]
    assert all(c["quarantined"] == 0 for c in report["checks"].values())
    assert result.summary()["files"]["train"] == {"path": train.path, "rows_in": 10, "rows_kept": 10, "rows_quarantined": 0}
    assert_accounting(result)


def test_every_check_has_a_severity_and_the_summary_keeps_its_keys(tmp_path: Path) -> None:
    result = validate_dataset(load(tmp_path, "t.jsonl", clean_rows(10)), None, make_cfg(), tmp_path / "out")
    checks = result.counts["checks"]
    assert {c["severity"] for c in checks.values()} == {"fatal", "row error", "warning"}
    assert {n for n, c in checks.items() if c["severity"] == "fatal"} == {
        "min_rows", "min_eval_rows", "max_leakage", "max_bad_fraction"
    }
    summary = result.summary()
    assert {"train_rows", "eval_rows", "files", "quarantined", "failed_checks"} <= set(summary)
    assert summary["warnings"] == {"dataset_size": 1}
    assert {row["check"] for row in summary["checks"]} == set(checks)


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
    check = result.counts["checks"]["exact_duplicate"]
    assert (check["flagged"], check["quarantined"], check["severity"]) == (3, 2, "row error")
    assert_accounting(result)
    from tasks.validate import summary_line

    line = summary_line(result.summary(), details=True)  # the stage's log line and the CLI's "data:" line
    assert line.startswith("train 12 rows in, 10 kept, 2 quarantined;") and "failed checks: exact_duplicate 2" in line
    assert "Data Docs:" in line and "warnings:" not in summary_line(result.summary())


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


def test_over_long_content_is_quarantined(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "train.jsonl", [*clean_rows(10), chat(90, answer="x" * 61), chat(91, answer="y" * 60)])
    result = validate_dataset(load_records(path), None, make_cfg(max_chars=60), tmp_path / "out")

    bad = quarantined_by_line(result, path)
    assert list(bad) == [11]
    assert bad[11][0].startswith("max_chars: messages[1] (assistant) has 61 characters")
    assert "validate.max_chars=60" in bad[11][0]


def test_encoding_problems_are_quarantined_with_a_fix(tmp_path: Path) -> None:
    rows = [
        *clean_rows(10),
        chat(80, answer="Bell\x07 rings"),
        chat(81, user="Is access \u202egranted\u202c?"),
        chat(82, answer="Zero\u200bwidth"),
        chat(83, answer="Our cafÃ© opens at 9 â€“ welcome"),
        chat(84, answer="Costs \ufffd20"),
        chat(85, answer="Café, naïve, Zürich, 東京, emoji 🚲 and a ZWJ family 👨‍👩‍👧 are fine"),
    ]
    path = write_rows(tmp_path / "train.jsonl", rows)
    result = validate_dataset(load_records(path), None, make_cfg(), tmp_path / "out")
    bad = quarantined_by_line(result, path)
    first = {line: reasons[0] for line, reasons in bad.items()}
    assert sorted(first) == [11, 12, 13, 14, 15]
    assert first[11].startswith("control_characters: messages[1] (assistant): U+0007 at character 4")
    assert "U+202E" in first[12] and "U+200B" in first[13]
    assert first[14].startswith("mojibake: messages[1] (assistant): mis-decoded text")
    assert "café" in first[14] and "UTF-8" in first[14]
    assert first[15].startswith("mojibake:") and "U+FFFD" in first[15]
    assert "r85" in {r["id"] for r in [*result.train, *result.eval]}


def test_personal_data_is_flagged_but_kept(tmp_path: Path) -> None:
    rows = [
        *clean_rows(10),
        chat(70, answer="Write to jane.doe@example.org."),
        chat(71, answer="Call +44 20 7946 0958 or (020) 7946-0958."),
        chat(72, answer="Card 4111 1111 1111 1111 on file."),
        chat(73, answer="Order 1234 5678 9012 3456 shipped on 2026-11-23 at 11:00, 45 euros."),
    ]
    path = write_rows(tmp_path / "train.jsonl", rows)
    result = validate_dataset(load_records(path), None, make_cfg(), tmp_path / "out")
    assert result.quarantined == []
    warned = {e["id"]: e["warnings"] for e in read_jsonl(result.warnings_path)}
    assert set(warned) == {"r70", "r71", "r72"}
    assert warned["r70"] == [warned["r70"][0]] and warned["r70"][0].startswith(
        "pii_email: messages[1] (assistant): email address 'jane.doe@example.org'"
    )
    assert warned["r71"][0].startswith("pii_phone:") and "+44 20 7946 0958" in warned["r71"][0]
    assert warned["r72"][0].startswith("pii_card:") and "ending 1111" in warned["r72"][0]
    assert "4111 1111" not in warned["r72"][0]  # the number itself is not repeated in the report
    assert result.summary()["warnings"] == {"pii_email": 1, "pii_phone": 1, "pii_card": 1, "dataset_size": 1}
    off = validate_dataset(load_records(path), None, make_cfg(pii=False), tmp_path / "off")
    assert "pii_email" not in off.counts["checks"] and read_jsonl(off.warnings_path) == []


def near_copy(i: int, new_id: str, *, edit: str = "case") -> dict[str, Any]:
    user = f"How often should I oil the chain of bike model {i} in winter when I ride daily?"
    answer = f"Oil the chain of model {i} every week in winter and wipe off the excess."
    edited = {"case": user.upper(), "punct": user.rstrip("?") + " !!", "word": user.replace("daily", "daily please")}
    return {"id": new_id, "messages": [{"role": "user", "content": edited[edit]}, {"role": "assistant", "content": answer}]}


def long_row(i: int) -> dict[str, Any]:
    return near_copy(i, f"orig{i}", edit="case") | {"messages": [
        {"role": "user", "content": f"How often should I oil the chain of bike model {i} in winter when I ride daily?"},
        {"role": "assistant", "content": f"Oil the chain of model {i} every week in winter and wipe off the excess."},
    ]}


def test_near_duplicates_keep_the_first_copy(tmp_path: Path) -> None:
    rows = [*clean_rows(10), long_row(7), near_copy(7, "c1", edit="case"), near_copy(7, "c2", edit="punct"),
            near_copy(7, "c3", edit="word"), long_row(8)]
    path = write_rows(tmp_path / "train.jsonl", rows)
    result = validate_dataset(load_records(path), None, make_cfg(), tmp_path / "out")

    bad = quarantined_by_line(result, path)
    assert sorted(bad) == [12, 13, 14]
    for reasons in bad.values():
        assert reasons[0].startswith("near_duplicate: nearly repeats line 11 (id orig7) (prompt similarity")
        assert "validate.near_dup_threshold=0.8" in reasons[0] and "which is kept" in reasons[0]
    # Model 8 differs from model 7 only in its numbers: a different fact, not a copy.
    assert {"orig7", "orig8"} <= {r["id"] for r in [*result.train, *result.eval]}
    assert result.counts["checks"]["near_duplicate"]["quarantined"] == 3

    off = validate_dataset(load_records(path), None, make_cfg(near_duplicates=False), tmp_path / "off")
    assert off.quarantined == [] and "near_duplicate" not in off.counts["checks"]
    assert any("validate.near_duplicates=false" in note for note in off.counts["notes"])


def test_leaking_train_row_leaves_train_and_eval_stays_intact(tmp_path: Path) -> None:
    train_path = write_rows(tmp_path / "train.jsonl", [*clean_rows(10), long_row(5)])
    leaking = chat(3, system="A different system prompt.") | {"id": "e-leak"}
    near = near_copy(5, "e-near", edit="punct")
    eval_path = write_rows(tmp_path / "eval.jsonl", [leaking, near, *clean_rows(2, start=100)])
    result = validate_dataset(load_records(train_path), load_records(eval_path), make_cfg(), tmp_path / "out")

    assert [r["id"] for r in result.eval] == ["e-leak", "e-near", "r100", "r101"]
    assert not {"r3", "orig5"} & {r["id"] for r in result.train}
    exact = next(e for e in result.quarantined if e["id"] == "r3")
    assert exact["split"] == "train" and exact["file"] == str(train_path) and exact["line"] == 4
    assert exact["reasons"][0].startswith("train_eval_leakage:") and "line 1 (id e-leak)" in exact["reasons"][0]
    nearly = next(e for e in result.quarantined if e["id"] == "orig5")
    assert nearly["reasons"][0].startswith("train_eval_near_leakage: nearly repeats eval row line 2 (id e-near)")
    assert result.counts["leakage"] == {"eval_rows_in_train": 2, "fraction": 0.5}
    assert_accounting(result)


def test_leakage_above_the_threshold_is_fatal(tmp_path: Path) -> None:
    train = load(tmp_path, "train.jsonl", clean_rows(20))
    evals = load(tmp_path, "eval.jsonl", [*clean_rows(3), *clean_rows(7, start=100)])
    cfg = make_cfg(max_leak_fraction=0.25)
    with pytest.raises(ValidationFailed) as info:
        validate_dataset(train, evals, cfg, tmp_path / "out")
    message = str(info.value)
    assert "eval.jsonl: 3 of 10 eval rows (30%) also appear in the training data" in message
    assert "validate.max_leak_fraction=0.25" in message and "fix:" in message
    cfg.validate_.max_leak_fraction = 0.3
    assert len(validate_dataset(train, evals, cfg, tmp_path / "ok").train) == 17


def test_leakage_is_checked_after_the_split_too(tmp_path: Path) -> None:
    # Same prompt and answer under two system prompts: not exact duplicates, but one copy must not train
    # while the other is evaluated.
    # The near-duplicate search (on by default) removes the second copies before the split; without it, the
    # leakage check after the split still keeps them apart.
    rows = [*clean_rows(30), *(chat(i, system="Other system prompt.") | {"id": f"s{i}"} for i in range(30))]
    train = load(tmp_path, "train.jsonl", rows)

    def pair(r: dict[str, Any]) -> tuple[str, str]:
        return r["messages"][-2]["content"], r["messages"][-1]["content"]

    result = validate_dataset(train, None, make_cfg(near_duplicates=False), tmp_path / "out")
    assert not {pair(r) for r in result.train} & {pair(r) for r in result.eval}
    leaked = [e for e in result.quarantined if e["reasons"][0].startswith("train_eval_leakage:")]
    assert leaked and len(result.train) + len(result.eval) + len(leaked) == 60
    assert_accounting(result)

    near = validate_dataset(train, None, make_cfg(), tmp_path / "near")
    assert not {pair(r) for r in near.train} & {pair(r) for r in near.eval}
    assert {e["reasons"][0].split(":")[0] for e in near.quarantined} == {"near_duplicate"}
    assert len(near.quarantined) == 30 and all(e["id"].startswith("s") for e in near.quarantined)


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
        "load": 2, "unique_id": 2, "role_order": 1, "non_empty_content": 1, "max_chars": 1,
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
    assert report["checks"]["min_rows"]["flagged"] == 1
    assert len(read_jsonl(info.value.quarantine_path)) == 1
    assert (info.value.report_path.parent / "data_docs" / "index.html").is_file()


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


def test_labels_are_checked_for_balance_and_coverage(tmp_path: Path) -> None:
    train = [{"text": f"Great service, visit {i}", "label": "positive"} for i in range(20)]
    train += [{"text": f"Slow repair, week {i}", "label": "negative"} for i in range(3)]
    evals = [{"text": "Fine bike", "label": "positive"}, {"text": "Broken bell", "label": "negative"},
             {"text": "Where is the shop", "label": "question"}]
    result = validate_dataset(load(tmp_path, "train.jsonl", train), load(tmp_path, "eval.jsonl", evals), make_cfg(),
                              tmp_path / "out")
    warnings = result.counts["dataset_warnings"]
    assert any(w.startswith("label_balance: label 'negative' has 3 training rows, 15% of the most common") for w in warnings)
    assert any(w.startswith("label_seen_in_train: label 'question' appears in 1 eval rows but in no training row")
               for w in warnings)
    assert result.summary()["warnings"] == {"label_balance": 1, "label_seen_in_train": 1, "dataset_size": 1}


@pytest.mark.parametrize(("rows", "advice"), [(20, "under 100 (validate.small_rows)"), (150, "under the ~1,000")])
def test_dataset_size_advice(tmp_path: Path, rows: int, advice: str) -> None:
    cfg = make_cfg()
    result = validate_dataset(load(tmp_path, "t.jsonl", clean_rows(rows)), None, cfg, tmp_path / "out")
    (warning,) = result.counts["dataset_warnings"]
    assert warning.startswith("dataset_size: ") and advice in warning
    assert f"train.method={cfg.train.method}" in warning


# ----------------------------------------------------------------------------------------------------------------
# Token lengths (the base model's tokenizer; here the tiny stand-in with the same ChatML template)


@pytest.fixture(scope="module")
def tokenizer():
    from tiny_model import build_tokenizer

    return build_tokenizer()


def test_token_lengths_match_training_and_flag_truncation(tmp_path: Path, tokenizer) -> None:
    from tasks.common.models import EncodingError, encode_chat

    long_prompt = chat(90, user="Can you help me with my bike? " * 20)
    long_answer = chat(91, answer="We will check the rental and reply within one working day. " * 8)
    rows = [*clean_rows(10), long_prompt, long_answer]
    path = write_rows(tmp_path / "train.jsonl", rows)
    cfg = make_cfg()
    cfg.model.max_length = 64
    result = validate_dataset(load_records(path), None, cfg, tmp_path / "out", tokenizer=tokenizer)

    bad = quarantined_by_line(result, path)
    assert list(bad) == [11]
    assert bad[11][0].startswith("answer_within_max_length: the first assistant answer starts at token ")
    with pytest.raises(EncodingError):  # the train stage would indeed have nothing to learn from it
        encode_chat(tokenizer, long_prompt, 64)
    (warned,) = read_jsonl(result.warnings_path)
    assert warned["id"] == "r91" and warned["warnings"][0].startswith("fits_max_length: ")
    n_tokens = int(re.search(r"fits_max_length: (\d+) tokens", warned["warnings"][0]).group(1))
    assert n_tokens == len(tokenizer(tokenizer.apply_chat_template(long_answer["messages"], tokenize=False),
                                     add_special_tokens=False)["input_ids"])
    for record in [*result.train, *result.eval]:  # every kept row has something to learn from
        assert any(label != -100 for label in encode_chat(tokenizer, record, 64)["labels"])
    assert not result.counts["notes"]


def test_token_checks_are_skipped_with_a_note_without_a_tokenizer(tmp_path: Path) -> None:
    result = validate_dataset(load(tmp_path, "t.jsonl", clean_rows(10)), None, make_cfg(), tmp_path / "out")
    assert "fits_max_length" not in result.counts["checks"]
    assert any(note.startswith("token-length checks skipped") for note in result.counts["notes"])


# ----------------------------------------------------------------------------------------------------------------
# The demo data, Data Docs, the command line


def test_demo_data_passes_with_no_row_errors(tmp_path: Path, tokenizer) -> None:
    from data_checks.similarity import jaccard, shingles

    cfg = FewtuneConfig(data={"train": "x"})
    train = load_records(REPO / "examples/support/train.jsonl")
    test = load_records(REPO / "examples/support/test.jsonl")
    result = validate_dataset(train, test, cfg, tmp_path / "out", tokenizer=tokenizer)
    assert result.quarantined == [] and len(result.train) == 250 and len(result.eval) == 50
    assert result.counts["leakage"]["eval_rows_in_train"] == 0
    assert set(result.summary()["warnings"]) <= {"pii_email", "pii_phone", "dataset_size", "fits_max_length"}

    # The five phrasings of a fact, and the rephrased test questions, stay well below the near-duplicate threshold.
    threshold, size = cfg.validate_.near_dup_threshold, cfg.validate_.shingle_size
    prompts = [(shingles(r["messages"][-2]["content"], size), r["messages"][-1]["content"]) for r in train.records]
    tests = [(shingles(r["messages"][-2]["content"], size), r["messages"][-1]["content"]) for r in test.records]
    same_fact = [jaccard(a, b) for i, (a, x) in enumerate(prompts) for b, y in prompts[i + 1:] if x == y]
    rephrased = [jaccard(a, b) for a, x in tests for b, y in prompts if x == y]
    assert len(same_fact) == 500 and max(same_fact) < threshold - 0.25
    assert len(rephrased) == 250 and max(rephrased) < threshold - 0.25


EXTERNAL_ASSET = re.compile(r"<(?:script|link|img)\b[^>]*(?:src|href)\s*=\s*[\"']?(?:https?:)?//", re.I)


def test_data_docs_open_offline_and_show_every_check(tmp_path: Path) -> None:
    rows = [*clean_rows(10), chat(2) | {"id": "copy"}, chat(70, answer="Mail jane@example.org")]
    path = write_rows(tmp_path / "train.jsonl", rows)
    result = validate_dataset(load_records(path), None, make_cfg(), tmp_path / "out")

    docs = result.docs_path.parent
    pages = sorted(docs.rglob("*.html"))
    assert result.docs_path == docs / "index.html" and len(pages) >= 7  # index + a validation page per suite ...
    for page in pages:
        html = page.read_text(encoding="utf-8")
        assert not EXTERNAL_ASSET.search(html), f"{page} loads something from the network"
        assert "<style>" in html
    index = result.docs_path.read_text(encoding="utf-8")
    for name, check in result.counts["checks"].items():
        row = re.search(rf"<tr><td><b>{name}</b></td><td[^>]*>{check['severity']}</td><td>[^<]*</td>"
                        rf"<td>{check['flagged']}</td><td>{check['quarantined']}</td><td>{check['warned']}</td>", index)
        assert row, f"check {name} and its counts are missing from the index"
    links = re.findall(r'href="(validations/[^"]+\.html)"', index)
    assert links and all((docs / link).is_file() for link in links)
    rows_page = (docs / next(link for link in links if link.startswith("validations/rows-train/"))).read_text()
    assert "exact_duplicate" in rows_page and "pii_email" in rows_page
    assert not (docs / "static" / "fonts").exists()


def test_cli_validate_exit_codes_counts_and_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    good = write_rows(tmp_path / "good.jsonl", [*clean_rows(12), chat(3) | {"id": "copy"}])
    def printed() -> tuple[str, str]:
        """What the command printed, as words (the console wraps long lines) and without any whitespace."""
        out = capsys.readouterr().out
        return " ".join(out.split()), "".join(out.split())

    assert main(["validate", str(good), "--out", str(tmp_path / "ok")]) == 0
    words, packed = printed()
    assert re.search(r"exact_duplicate │ row error │ 2 │ 1 │ 0", words)
    assert "13 rows in, 12 kept" in words and "usable: 10 training rows, 2 eval rows, 1 quarantined" in words
    assert str(tmp_path / "ok" / "quarantine.jsonl") in packed and str(tmp_path / "ok" / "data_docs") in packed
    assert "token-length checks skipped" in words

    few = write_rows(tmp_path / "few.jsonl", clean_rows(3))
    assert main(["validate", str(few), "--out", str(tmp_path / "bad")]) == 2
    words, _ = printed()
    assert "not usable" in words and "fewer than validate.min_rows" in words and "min_rows │ fatal │ 1" in words

    (tmp_path / "data.txt").write_text("hello\n")
    assert main(["validate", str(tmp_path / "data.txt")]) == 2
    assert "unsupported file type" in printed()[0]


# ----------------------------------------------------------------------------------------------------------------
# The near-duplicate search on its own


def test_near_duplicate_search_finds_copy_edits_not_paraphrases() -> None:
    from data_checks.similarity import lsh_bands, miss_probability, near_copies, near_duplicates, normalize

    assert normalize("  Are you OPEN on Sundays?!  ") == "are you open on sundays"
    prompts = [
        "Are you open on Sundays during the summer holidays?",
        "are you open on sundays during the summer holidays",  # case and punctuation
        "Are you open on Sundys during the summer holidays?",  # a typo
        "Do you open your doors on Sundays in the summer?",  # a paraphrase
        "Are you open on Sundays during the winter holidays?",  # a different question
        "Are you open on Sundays during the summer holidays?",  # same question, other answer
    ]
    answers = ["Yes, from 11:00 to 16:00."] * 5 + ["No, we are closed."]
    found = near_duplicates(prompts, answers, threshold=0.8, shingle_size=3, num_perm=128)
    assert sorted(found) == [1, 2] and {m.other for m in found.values()} == {0}
    assert all(m.prompt_similarity >= 0.8 and m.answer_similarity == 1.0 for m in found.values())

    # Every train row that nearly repeats an eval row is found, with all the eval rows it repeats.
    hits = near_copies(prompts[1:3], answers[1:3], [prompts[0], prompts[0] + " "], answers[:2],
                       threshold=0.8, shingle_size=3, num_perm=128)
    assert {k: [m.other for m in v] for k, v in hits.items()} == {0: [0, 1], 1: [0, 1]}

    bands, rows = lsh_bands(0.8, 128)
    assert bands * rows <= 128 and miss_probability(0.8, 0.8, 128) <= 0.01
    assert miss_probability(0.95, 0.8, 128) < miss_probability(0.8, 0.8, 128)
