"""Merging the results of a sharded run: one set of rows and one report."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from tasks.augment.duplicates import DatasetDuplicates
from tasks.augment.report import _note, _varied_examples, write_report
from tasks.augment.rows import PARAPHRASE, _question
from tasks.augment.stage import AugmentResult
from tasks.common.records import read_jsonl, write_jsonl
from tasks.config import FewtuneConfig


def merge_reports(reports: list[dict[str, Any]], cfg: FewtuneConfig) -> dict[str, Any]:
    """One report from the reports of shards (counts summed, examples and perplexities pooled)."""
    reports = [r for r in reports if r.get("techniques") is not None and "rows_in" in r]
    if not reports:
        return {}
    merged: dict[str, Any] = {k: reports[0][k] for k in ("enabled", "plan", "generator")}
    for key in ("rows_in", "rows_out", "added", "replaced"):
        merged[key] = sum(r[key] for r in reports)
    techniques: dict[str, Any] = {}
    for r in reports:
        for name, t in r["techniques"].items():
            m = techniques.setdefault(name, {"mode": t["mode"], "rows_planned": 0, "rows_attempted": 0, "rows_not_attempted": 0,
                                             "generated": 0, "kept": 0, "rejected": 0, "rejected_by_rule": Counter(),
                                             "kept_by_rule": Counter(), "seconds": 0.0, "examples": {"kept": [], "rejected": []}})
            for key in ("rows_planned", "rows_attempted", "rows_not_attempted", "generated", "kept", "rejected", "seconds"):
                m[key] += t[key]
            m["rejected_by_rule"].update(t["rejected_by_rule"])
            m["kept_by_rule"].update(t["kept_by_rule"])
            for kind in ("kept", "rejected"):
                m["examples"][kind] += t["examples"][kind]
    n_ex = cfg.augment.examples_in_report
    for m in techniques.values():
        m["rejected_by_rule"], m["kept_by_rule"] = dict(m["rejected_by_rule"].most_common()), dict(m["kept_by_rule"].most_common())
        m["examples"] = {"kept": m["examples"]["kept"][:n_ex], "rejected": _varied_examples(m["examples"]["rejected"], n_ex)}
    merged["techniques"] = techniques
    per_row = [row for r in reports for row in r.get("perplexity_per_row", [])]
    merged["perplexity_per_row"] = per_row
    merged["perplexity"] = {"rows": 0}
    if per_row:
        gold = [row["gold_ppl"] for row in per_row]
        new = [row["rewrite_ppl"] for row in per_row]
        corpus = [r["perplexity"] for r in reports if r["perplexity"].get("rows")]
        merged["perplexity"] = {
            "rows": len(per_row),
            "gold_mean_ppl": round(sum(gold) / len(gold), 3),
            "rewrite_mean_ppl": round(sum(new) / len(new), 3),
            # token-weighted corpus perplexity is not recoverable per shard: the row-weighted geometric mean of shards'
            "gold_corpus_ppl": round(math.exp(sum(math.log(c["gold_corpus_ppl"]) * c["rows"] for c in corpus) / len(per_row)), 3),
            "rewrite_corpus_ppl": round(math.exp(sum(math.log(c["rewrite_corpus_ppl"]) * c["rows"] for c in corpus) / len(per_row)), 3),
            "rows_lower": sum(n < g for n, g in zip(new, gold)),
        }
    rows = [row for r in reports for row in r["leakage"]["rows"]]
    merged["leakage"] = {"checked": any(r["leakage"]["checked"] for r in reports), "dropped": len(rows), "rows": rows}
    stops = [r["budget"]["stopped_by"] for r in reports if r["budget"]["stopped_by"]]
    merged["budget"] = {"max_new_rows": sum(r["budget"]["max_new_rows"] for r in reports), "max_seconds": reports[0]["budget"]["max_seconds"],
                        "kept": sum(r["budget"]["kept"] for r in reports), "stopped_by": stops[0] if stops else None}
    merged["seconds"] = {k: max(r["seconds"][k] for r in reports) for k in reports[0]["seconds"]}
    merged["note"] = _note(merged)
    return merged


def merge_shard_results(results: list[AugmentResult], out_dir: Path, cfg: FewtuneConfig) -> AugmentResult:
    """One result from the shards of a sharded run: rows in shard order, paraphrases repeated across shards dropped."""
    records = [r for result in results for r in result.records]
    duplicates = DatasetDuplicates([r for r in records if r.get("source") != PARAPHRASE], cfg.validate_)
    kept, rejected = [], [row for result in results if result.rejected_path for row in read_jsonl(result.rejected_path)]
    for r in records:
        if r.get("source") == PARAPHRASE:
            why = duplicates.reason(r, new_question=True)
            if why:
                rejected.append({"technique": PARAPHRASE, "parent_id": r["parent_id"], "rule": "duplicate", "reason": why,
                                 "prompt": None, "original": None, "candidate": _question(r), "similarity": None})
                continue
            duplicates.add(r)
        kept.append(r)
    report = merge_reports([r.report for r in results], cfg)
    dropped = len(records) - len(kept)
    if dropped:
        report["techniques"][PARAPHRASE]["kept"] -= dropped
        report["techniques"][PARAPHRASE]["rejected"] += dropped
        by_rule = Counter(report["techniques"][PARAPHRASE]["rejected_by_rule"])
        by_rule["duplicate"] += dropped
        report["techniques"][PARAPHRASE]["rejected_by_rule"] = dict(by_rule.most_common())
        report["rows_out"] -= dropped
        report["added"] -= dropped
    report["note"] = _note(report) + f" ({len(results)} shards on Dask)"
    out_dir = Path(out_dir)
    path = write_jsonl(out_dir / "train.jsonl", kept)
    rejected_path = write_jsonl(out_dir / "rejected.jsonl", rejected)
    report_path, markdown_path = write_report(report, out_dir)
    return AugmentResult(kept, sum(r.added for r in results) - dropped, path, report["note"], report, report_path, markdown_path, rejected_path)


def merge_augmented(shard_results: list[AugmentResult], out_dir: str | Path, cfg: FewtuneConfig | None = None) -> AugmentResult:
    """Concatenate shard `AugmentResult`s (in shard order) into one, written to `<out_dir>/train.jsonl`.

    With `cfg` (a FewtuneConfig), paraphrases that repeat another shard's are dropped and the shards' augmentation
    reports are merged into one.
    """
    if cfg is not None and any(r.report.get("techniques") for r in shard_results):
        return merge_shard_results(shard_results, Path(out_dir), cfg)
    records = [r for result in shard_results for r in result.records]
    notes = sorted({result.note for result in shard_results})
    note = "; ".join(notes) + f" ({len(shard_results)} shards on Dask)"
    path = write_jsonl(Path(out_dir) / "train.jsonl", records)
    return AugmentResult(records=records, added=sum(r.added for r in shard_results), path=path, note=note)
