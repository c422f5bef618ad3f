"""Bad input, counted: every case of the hostile dataset corpus through the loader and the validate stage.

    python benchmarks/bench_reliability.py [--out DIR]

For each case of tests/fixtures/corpus/ (malformed JSON, wrong encodings, hostile field values, duplicate and
leaking rows, ...; the expected outcome of each is in its expected.json) prints whether it ended in one clear
message (naming the file, no traceback) or in usable rows with a quarantine, and the row accounting of every file:
rows in, rows kept, rows quarantined. Exits non-zero when any case ends otherwise, or when rows in differs from rows
kept plus rows quarantined anywhere. The totals are the figures of docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.common.records import DataError, load_records  # noqa: E402
from tasks.config import FewtuneConfig  # noqa: E402
from tasks.validate import ValidationFailed, validate_dataset  # noqa: E402

CORPUS = REPO / "tests" / "fixtures" / "corpus"


def run_case(name: str, case: dict, out: Path) -> dict:
    """One case: its outcome (`message` or `quarantine`) and, for usable data, the accounting of each file."""
    files = [CORPUS / case["train"], *([CORPUS / case["eval"]] if "eval" in case else [])]
    try:
        loaded = [load_records(p) for p in files]
        cfg = FewtuneConfig(data={"train": "unused.jsonl"}, run={"runs_dir": str(out)})
        result = validate_dataset(loaded[0], loaded[1] if len(loaded) > 1 else None, cfg, out)
    except (DataError, ValidationFailed) as exc:
        text = str(exc)
        clear = "Traceback" not in text and any(p.name in text for p in files)
        return {"case": name, "outcome": "message" if clear else "UNCLEAR MESSAGE", "expected": bool(case.get("fatal")),
                "rows": []}
    rows = []
    for role, load in zip(("train", "eval"), loaded):
        f = result.counts["files"][role]
        rows.append({"rows_in": load.rows_in, "kept": f["rows_kept"], "quarantined": f["rows_quarantined"],
                     "balanced": f["rows_in"] == load.rows_in == f["rows_kept"] + f["rows_quarantined"]})
    return {"case": name, "outcome": "quarantine", "expected": not case.get("fatal"), "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the validate stage's outputs (default: a temporary one)")
    args = parser.parse_args()
    expected = json.loads((CORPUS / "expected.json").read_text(encoding="utf-8"))
    out = args.out or Path(tempfile.mkdtemp(prefix="fewtune-reliability-"))
    start = time.perf_counter()
    results = [run_case(name, case, out / name) for name, case in sorted(expected.items())]
    seconds = time.perf_counter() - start
    print(f"{'case':<34} {'outcome':<12} {'rows in':>8} {'kept':>6} {'quarantined':>12}")
    for r in results:
        rows_in = sum(x["rows_in"] for x in r["rows"])
        kept = sum(x["kept"] for x in r["rows"])
        quarantined = sum(x["quarantined"] for x in r["rows"])
        flag = "" if r["expected"] and all(x["balanced"] for x in r["rows"]) else "  <-- FAILED"
        figures = f"{rows_in:>8} {kept:>6} {quarantined:>12}" if r["rows"] else f"{'-':>8} {'-':>6} {'-':>12}"
        print(f"{r['case']:<34} {r['outcome']:<12} {figures}{flag}")
    usable = [r for r in results if r["outcome"] == "quarantine"]
    files = [x for r in usable for x in r["rows"]]
    failed = [r["case"] for r in results if not r["expected"] or not all(x["balanced"] for x in r["rows"])]
    print(
        f"\n{len(results)} cases in {seconds:.1f} s: {sum(r['outcome'] == 'message' for r in results)} ended in one clear "
        f"message naming the file, {len(usable)} in usable rows; {len(files)} files accounted: "
        f"{sum(x['rows_in'] for x in files)} rows in = {sum(x['kept'] for x in files)} kept + "
        f"{sum(x['quarantined'] for x in files)} quarantined; balanced in {sum(x['balanced'] for x in files)} of "
        f"{len(files)} files; unexpected outcomes: {', '.join(failed) or 'none'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
