"""The stage's report: counts per technique, examples kept and rejected, perplexity; as JSON and as Markdown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.augment.batching import Budget, TechniqueLog
from tasks.augment.plan import Plan
from tasks.augment.rows import PARAPHRASE, SELF_DISTILLED
from tasks.config import FewtuneConfig

_EXAMPLE_KEYS = ("parent_id", "rule", "reason", "prompt", "original", "candidate", "similarity")


def _example(item: dict[str, Any]) -> dict[str, Any]:
    return {k: item.get(k) for k in _EXAMPLE_KEYS}


def build_report(
    cfg: FewtuneConfig,
    plan: Plan,
    generator: str,
    logs: dict[str, TechniqueLog],
    budget: Budget,
    perplexity: dict[str, Any],
    leak_dropped: list[dict[str, Any]],
    *,
    rows_in: int,
    rows_out: int,
    added: int,
    replaced: int,
    seconds: dict[str, float],
    leakage_checked: bool,
) -> dict[str, Any]:
    a = cfg.augment
    n_ex = a.examples_in_report
    techniques = {}
    for name, lg in logs.items():
        if lg.rows_planned == 0:
            continue
        entry = lg.counts()
        entry["examples"] = {
            "kept": [_example(k) for k in lg.kept[:n_ex]],
            "rejected": _varied_examples(lg.rejected, n_ex),
        }
        techniques[name] = entry
    report = {
        "enabled": a.enabled,
        "plan": {"self_distill": plan.self_distill, "paraphrase_n": plan.paraphrase_n, "reasons": plan.reasons,
                 "outliers_sent": len(plan.outlier_ids)},
        "generator": generator,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "added": added,
        "replaced": replaced,
        "techniques": techniques,
        "perplexity": {k: v for k, v in perplexity.items() if k != "per_row"},
        "perplexity_per_row": perplexity.get("per_row", []),
        "leakage": {"checked": leakage_checked, "dropped": len(leak_dropped), "rows": leak_dropped},
        "budget": {"max_new_rows": budget.max_new_rows, "max_seconds": budget.max_seconds, "kept": budget.kept,
                   "stopped_by": budget.stopped},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    report["note"] = _note(report)
    return report


def _varied_examples(rejected: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to `n` rejected examples, one per rule first, so the report shows the different reasons."""
    picked, seen = [], set()
    for item in rejected:
        if item["rule"] not in seen:
            picked.append(item)
            seen.add(item["rule"])
    picked += [r for r in rejected if r not in picked]
    return [_example(r) for r in picked[:n]]


def _note(report: dict[str, Any]) -> str:
    parts = []
    t = report["techniques"]
    if SELF_DISTILLED in t:
        s = t[SELF_DISTILLED]
        text = f"self-distillation ({s['mode']}): {s['kept']} of {s['generated']} rewrites kept"
        ppl = report["perplexity"]
        if ppl.get("rows"):
            text += f" (base-model perplexity {ppl['gold_mean_ppl']:.1f} gold -> {ppl['rewrite_mean_ppl']:.1f} rewrites)"
        parts.append(text)
    if PARAPHRASE in t:
        p = t[PARAPHRASE]
        parts.append(f"paraphrase ({p['mode']}): {p['kept']} of {p['generated']} kept")
    text = "; ".join(parts) or "nothing generated"
    text += f"; {report['rows_in']} rows in, {report['rows_out']} out ({report['added']} added, {report['replaced']} replaced)"
    if report["leakage"]["dropped"]:
        text += f"; {report['leakage']['dropped']} dropped for leaking into eval"
    b = report["budget"]
    if b["stopped_by"] == "max_seconds":
        text += f"; generation stopped by augment.max_seconds={b['max_seconds']:g} (rows that passed are kept)"
    elif b["stopped_by"] == "max_new_rows":
        text += f"; generation stopped at augment.max_new_rows={b['max_new_rows']}"
    return text


def _cell(text: Any, limit: int = 160) -> str:
    s = " ".join(str(text if text is not None else "").split()).replace("|", "/")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def report_markdown(report: dict[str, Any]) -> str:
    """A short Markdown summary: counts per technique, perplexity, examples kept and rejected with reasons."""
    lines = ["# Augmentation", "", report["note"], ""]
    if not report.get("techniques"):
        return "\n".join(lines)
    lines += [f"Generator: {report['generator']}. Plan: self-distillation {report['plan']['self_distill']} "
              f"({report['plan']['reasons']['self_distill']}); paraphrases n={report['plan']['paraphrase_n']} "
              f"({report['plan']['reasons']['paraphrase']}).", ""]
    lines += ["| technique | rows planned | attempted | generated | kept | rejected | rejected by rule |", "|---|---|---|---|---|---|---|"]
    for name, t in report["techniques"].items():
        rules = ", ".join(f"{k} {v}" for k, v in t["rejected_by_rule"].items()) or "-"
        lines.append(f"| {name} ({t['mode']}) | {t['rows_planned']} | {t['rows_attempted']} | {t['generated']} | {t['kept']} | {t['rejected']} | {rules} |")
    ppl = report["perplexity"]
    if ppl.get("rows"):
        lines += ["", f"Base-model perplexity of the {ppl['rows']} kept rewrites against their gold answers: mean "
                  f"{ppl['gold_mean_ppl']:.2f} (gold) -> {ppl['rewrite_mean_ppl']:.2f} (rewrites); over all tokens "
                  f"{ppl['gold_corpus_ppl']:.2f} -> {ppl['rewrite_corpus_ppl']:.2f}; lower for {ppl['rows_lower']} of {ppl['rows']} rows."]
    leak = report["leakage"]
    lines += ["", f"Leakage re-check against the eval rows: {leak['dropped']} augmented rows dropped." if leak["checked"]
              else "Leakage re-check: no eval rows given."]
    b = report["budget"]
    lines += [f"Budget: {b['kept']} augmented rows of max_new_rows {b['max_new_rows']}, "
              f"{report['seconds']['generation']:.0f} s of generation of max_seconds {b['max_seconds']:g}"
              + (f"; stopped by {b['stopped_by']}." if b["stopped_by"] else ".")]
    for name, t in report["techniques"].items():
        original = "gold answer" if name == SELF_DISTILLED else "original prompt"
        for kind in ("kept", "rejected"):
            examples = t["examples"][kind]
            if not examples:
                continue
            lines += ["", f"## {name}: {kind} examples", "", f"| row | {original} | generated | {'why kept' if kind == 'kept' else 'why rejected'} |", "|---|---|---|---|"]
            for e in examples:
                lines.append(f"| {_cell(e['parent_id'], 40)} | {_cell(e['original'])} | {_cell(e['candidate'])} | {_cell(e['rule'] + ': ' + e['reason'])} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    report_path = out_dir / "augment_report.json"
    report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    markdown_path = out_dir / "augment_report.md"
    markdown_path.write_text(report_markdown(report), encoding="utf-8")
    return report_path, markdown_path
