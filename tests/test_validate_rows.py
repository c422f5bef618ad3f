"""Validate stage, row by row: checks and severities, quarantine with reasons, duplicates, role order, content,
encoding, personal data, near-duplicates and leakage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from validate_helpers import (
    assert_accounting,
    chat,
    clean_rows,
    from_records,
    load,
    make_cfg,
    quarantined_by_line,
    write_rows,
)

from tasks.common.records import load_records, read_jsonl
from tasks.validate import ValidationFailed, summary_line, validate_dataset


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
