"""Validate stage, dataset-wide: loader rejects and accounting, fatal conditions, the held-out split, labels and
size advice, token lengths, the demo data, offline Data Docs, the `fewtune validate` command, and the
near-duplicate search on its own."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from validate_helpers import (
    REPO,
    assert_accounting,
    chat,
    clean_rows,
    load,
    make_cfg,
    quarantined_by_line,
    write_rows,
)

from data_checks.similarity import (
    jaccard,
    lsh_bands,
    miss_probability,
    near_copies,
    near_duplicates,
    normalize,
    shingles,
)
from flows.cli import main
from tasks.common.models import EncodingError, encode_chat
from tasks.common.records import load_records, read_jsonl
from tasks.config import FewtuneConfig
from tasks.validate import ValidationFailed, validate_dataset

from tiny_model import build_tokenizer


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
    return build_tokenizer()


def test_token_lengths_match_training_and_flag_truncation(tmp_path: Path, tokenizer) -> None:
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
