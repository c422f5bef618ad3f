"""Malformed and hostile dataset files: every one ends in a clear message or a quarantine, never a traceback.

The corpus lives in tests/fixtures/corpus/ (written by tests/fixtures/make_corpus.py, with the expected outcome
of each case in expected.json). A hypothesis fuzz test feeds the loader and the validate stage arbitrary bytes and
arbitrary JSON rows; the row accounting must hold whatever comes in.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Any

import pytest
from fixtures.make_corpus import cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.common.records import DataError, LoadResult, load_records, read_jsonl
from tasks.config import FewtuneConfig
from tasks.validate import ValidationFailed, ValidationResult, validate_dataset

CORPUS = Path(__file__).resolve().parent / "fixtures" / "corpus"
EXPECTED: dict[str, dict[str, Any]] = json.loads((CORPUS / "expected.json").read_text(encoding="utf-8"))


def test_corpus_is_large_and_current() -> None:
    files = [p for p in CORPUS.iterdir() if p.name != "expected.json"]
    assert len(files) >= 40 and len(EXPECTED) >= 40
    regenerated = cases()
    assert sorted(regenerated) == sorted(EXPECTED), "regenerate with: python tests/fixtures/make_corpus.py"
    for name, case in regenerated.items():
        for filename, data in case["files"].items():
            assert (CORPUS / filename).read_bytes() == data, f"{filename} is stale; run tests/fixtures/make_corpus.py"


def cfg_for(out: Path) -> FewtuneConfig:
    return FewtuneConfig(data={"train": "unused.jsonl"}, run={"runs_dir": str(out)})


def assert_accounting(result: ValidationResult, *loaded: LoadResult) -> None:
    files = result.counts["files"]
    for role, load in zip(("train", "eval"), loaded):
        f = files[role]
        assert f["rows_in"] == load.rows_in == f["rows_kept"] + f["rows_quarantined"]
    assert len(read_jsonl(result.quarantine_path)) == len(result.quarantined)
    assert all(entry["reasons"] for entry in result.quarantined)


def run_case(name: str, out: Path) -> tuple[str, Any]:
    """('fatal', message) or ('usable', result) for one corpus case; any other exception fails the test."""
    case = EXPECTED[name]
    train_path = CORPUS / case["train"]
    eval_path = CORPUS / case["eval"] if "eval" in case else None
    try:
        train = load_records(train_path)
        evals = load_records(eval_path) if eval_path else None
        result = validate_dataset(train, evals, cfg_for(out), out)
    except (DataError, ValidationFailed) as exc:
        return "fatal", str(exc)
    assert_accounting(result, train, *([evals] if evals else []))
    return "usable", result


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_case(name: str, tmp_path: Path) -> None:
    case = EXPECTED[name]
    outcome, value = run_case(name, tmp_path / "out")
    if case.get("fatal"):
        assert outcome == "fatal", f"{name}: expected a fatal message, got a usable result"
        assert case["fatal"] in value
        named = [case["train"], case.get("eval") or case["train"]]
        assert any(n in value for n in named), f"the message must name the file: {value}"
        assert "Traceback" not in value
        return
    assert outcome == "usable", f"{name}: expected usable data, got: {value}"
    first_reasons: dict[str, int] = {}
    for entry in value.quarantined:
        check = entry["reasons"][0].split(":", 1)[0]
        first_reasons[check] = first_reasons.get(check, 0) + 1
        assert entry["file"].endswith((case["train"], case.get("eval", "-")))
        assert entry["line"] is not None
    assert first_reasons == case.get("quarantined", {})
    warnings = {k: v for k, v in value.summary()["warnings"].items() if k != "dataset_size"}
    assert warnings == case.get("warnings", {})


def test_a_one_megabyte_field_is_quarantined_not_fatal(tmp_path: Path) -> None:
    big = "x" * 1_000_000
    rows = [{"prompt": f"Question {i} about saddles?", "completion": f"Answer {i} about bells."} for i in range(12)]
    for suffix in ("jsonl", "csv"):
        path = tmp_path / f"big.{suffix}"
        if suffix == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {"prompt": "long", "completion": big}]))
        else:
            lines = ["prompt,completion", *(f"{r['prompt']},{r['completion']}" for r in rows), f"long,{big}"]
            path.write_text("\n".join(lines) + "\n")
        train = load_records(path)
        result = validate_dataset(train, None, cfg_for(tmp_path), tmp_path / suffix)
        (entry,) = result.quarantined
        assert entry["reasons"][0].startswith("max_chars: messages[1] (assistant) has 1000000 characters")
        assert_accounting(result, train)


# ----------------------------------------------------------------------------------------------------------------
# Fuzzing

FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# Examples per fuzz test; raise for a deeper search, e.g. FEWTUNE_FUZZ_SCALE=10 pytest tests/test_data_corpus.py
SCALE = int(os.environ.get("FEWTUNE_FUZZ_SCALE", "1"))


def _lines_in(data: bytes) -> int:
    return sum(1 for line in data.split(b"\n") if line.strip())


@settings(max_examples=300 * SCALE, **FUZZ_SETTINGS)
@given(data=st.binary(max_size=3000), suffix=st.sampled_from(["jsonl", "json", "csv", "parquet"]))
def test_loader_fuzz_bytes(tmp_path: Path, data: bytes, suffix: str) -> None:
    path = tmp_path / f"fuzz.{suffix}"
    path.write_bytes(data)
    try:
        loaded = load_records(path)
    except DataError as exc:
        assert str(path) in str(exc)
        return
    assert loaded.rows_in == len(loaded.records) + len(loaded.rejects) > 0
    if suffix in ("jsonl", "json") and not data.lstrip(b"\xef\xbb\xbf").lstrip().startswith(b"["):
        assert loaded.rows_in == _lines_in(data.removeprefix(b"\xef\xbb\xbf"))  # every non-blank line accounted for
    for reject in loaded.rejects:
        json.dumps(reject.to_dict(), ensure_ascii=False).encode("utf-8")  # quarantine can always be written


# Any character, plus the troublesome ones: NUL, a bidi override, mojibake halves, U+FFFD, an unpaired surrogate
# (written as a JSON \\u escape, it decodes to text that cannot be written back as UTF-8).
text = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(["\x00", "\u202e", "Ã", "©", "\ufffd", "\n", " ",
                                                                         "\ud800"]), max_size=40)
scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | text
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "bot", ""]) | scalar, "content": scalar}
) | st.dictionaries(st.sampled_from(["role", "content", "name"]), scalar, max_size=3)
raw_row = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}, optional={"id": scalar, "label": scalar}),
    st.fixed_dictionaries({"prompt": scalar, "completion": scalar}, optional={"id": scalar, "source": scalar}),
    st.fixed_dictionaries({"instruction": scalar, "output": scalar}, optional={"input": scalar}),
    st.fixed_dictionaries({"text": scalar, "label": scalar}),
    st.dictionaries(st.text(string.ascii_lowercase, max_size=6), scalar, max_size=3),
    scalar,
    st.lists(scalar, max_size=3),
)
line = raw_row.map(lambda r: json.dumps(r)) | st.text(max_size=30)


@settings(max_examples=300 * SCALE, **FUZZ_SETTINGS)
@given(lines=st.lists(line, min_size=1, max_size=10), suffix=st.sampled_from(["jsonl", "json"]))
def test_loader_fuzz_rows(tmp_path: Path, lines: list[str], suffix: str) -> None:
    path = tmp_path / f"rows.{suffix}"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    try:
        loaded = load_records(path)
    except DataError as exc:
        assert str(path) in str(exc)
        return
    data = path.read_bytes()
    if not data.lstrip().startswith(b"["):
        assert loaded.rows_in == _lines_in(data)
    for record in loaded.records:  # every kept record is canonical and can be written as UTF-8 JSON
        messages = record["messages"]
        assert messages and messages[-1]["role"] == "assistant"
        assert all(m["role"] in ("system", "user", "assistant") and m["content"].strip() for m in messages)
        assert isinstance(record["id"], str)
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    for reject in loaded.rejects:
        assert reject.reason
        json.dumps(reject.to_dict(), ensure_ascii=False).encode("utf-8")


def _good(i: int) -> dict[str, Any]:
    return {"id": f"g{i}", "messages": [{"role": "user", "content": f"How do I fix puncture number {i}?"},
                                        {"role": "assistant", "content": f"Patch {i}: sand, glue and press."}]}


@settings(max_examples=25 * SCALE, **FUZZ_SETTINGS)
@given(train_lines=st.lists(line, min_size=1, max_size=12), eval_lines=st.none() | st.lists(line, max_size=6),
       good=st.integers(min_value=0, max_value=12))
def test_validate_fuzz_rows(tmp_path_factory: pytest.TempPathFactory, train_lines: list[str],
                            eval_lines: list[str] | None, good: int) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    train_path = tmp / "train.jsonl"
    train_path.write_text("\n".join([*train_lines, *(json.dumps(_good(i)) for i in range(good))]) + "\n",
                          encoding="utf-8", errors="surrogatepass")
    eval_path = None
    if eval_lines is not None:
        eval_path = tmp / "eval.jsonl"
        eval_path.write_text("\n".join([*eval_lines, *(json.dumps(_good(100 + i)) for i in range(3))]) + "\n",
                             encoding="utf-8", errors="surrogatepass")
    cfg = cfg_for(tmp)
    cfg.data.max_bad_fraction = 1.0
    try:
        train = load_records(train_path)
        evals = load_records(eval_path) if eval_path else None
        result = validate_dataset(train, evals, cfg, tmp / "out")
    except DataError as exc:
        assert str(train_path) in str(exc) or str(eval_path) in str(exc)
        return
    except ValidationFailed as exc:
        report = json.loads(exc.report_path.read_text(encoding="utf-8"))
        for f in report["files"].values():
            assert f["rows_in"] == f["rows_kept"] + f["rows_quarantined"]
        assert exc.problems
        return
    assert_accounting(result, train, *([evals] if evals else []))
    kept = read_jsonl(result.train_path) + read_jsonl(result.eval_path)
    assert all(r["messages"][-1]["role"] == "assistant" for r in kept)
