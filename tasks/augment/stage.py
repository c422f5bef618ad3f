"""The stage entry `augment_records`: plan, generate in batches, filter, keep within budgets, write the stage's files."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.augment.batching import Budget, TechniqueLog, _batch_steps, _take_turns
from tasks.augment.duplicates import DatasetDuplicates, EvalLeakage
from tasks.augment.embedder import Embedder
from tasks.augment.filters import Verdict, judge_paraphrase, judge_rewrite
from tasks.augment.generators import Generated, Generator, make_generator
from tasks.augment.perplexity import read_gold_scores, rewrite_perplexity
from tasks.augment.plan import plan_augmentation, spread_order
from tasks.augment.report import build_report, write_report
from tasks.augment.rows import (
    GOLD,
    PARAPHRASE,
    SELF_DISTILLED,
    _answer,
    _question,
    clean_generation,
    paraphrase_conversation,
    rewrite_conversation,
    with_answer,
    with_question,
)
from tasks.common.models import load_base, load_tokenizer, resolve_base_model
from tasks.common.records import write_jsonl
from tasks.config import FewtuneConfig

log = logging.getLogger("fewtune.augment")


@dataclass
class AugmentResult:
    records: list[dict[str, Any]]
    added: int
    path: Path
    note: str
    report: dict[str, Any] = field(default_factory=dict)
    report_path: Path | None = None
    markdown_path: Path | None = None
    rejected_path: Path | None = None

    def summary(self) -> dict[str, Any]:
        """What the run summary shows of this stage."""
        out: dict[str, Any] = {"rows": len(self.records), "added": self.added, "note": self.note}
        rep = self.report
        if rep.get("techniques"):
            out["replaced"] = rep.get("replaced", 0)
            out["techniques"] = {k: {c: v[c] for c in ("mode", "kept", "rejected", "rejected_by_rule", "rows_not_attempted")} for k, v in rep["techniques"].items()}
            out["perplexity"] = rep.get("perplexity")
            out["leakage_dropped"] = rep.get("leakage", {}).get("dropped", 0)
            out["stopped_by"] = rep.get("budget", {}).get("stopped_by")
            out["seconds"] = rep.get("seconds", {}).get("total")
        for name, path in (("report_path", self.report_path), ("markdown_path", self.markdown_path), ("rejected_path", self.rejected_path)):
            if path is not None:
                out[name] = str(path)
        return out


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _unique_id(wanted: str, taken: set[str]) -> str:
    new, k = wanted, 1
    while new in taken:
        k += 1
        new = f"{wanted}-{k}"
    taken.add(new)
    return new


def augment_records(
    records: list[dict[str, Any]],
    cfg: FewtuneConfig,
    out_dir: Path,
    *,
    base_path: str | None = None,
    eval_records: list[dict[str, Any]] | None = None,
    outlier_ids: Sequence[str] = (),
    scores_path: str | Path | None = None,
    context_records: list[dict[str, Any]] | None = None,
    max_new_rows: int | None = None,
    generator: Generator | None = None,
) -> AugmentResult:
    """Self-distil and paraphrase `records` (the training rows) as `cfg.augment` says; write the stage's files.

    `eval_records`: the held-out rows the leakage rule checks new rows against. `outlier_ids`: rows the score stage
    sent here for rewriting. `scores_path`: the score stage's table (gold perplexities are read from it).
    `context_records`: all training rows, when `records` is one shard of them (duplicates are searched in all).
    `max_new_rows`: this call's share of `augment.max_new_rows` (a shard's). `generator`: use this one instead of
    building the configured one.
    """
    a = cfg.augment
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    plan = plan_augmentation(records, a, outlier_ids)
    if not plan.active:
        note = "augmentation disabled (augment.enabled=false): training rows passed through unchanged"
        if a.enabled:
            note = f"augmentation found nothing to do ({plan.reasons['self_distill']}; {plan.reasons['paraphrase']}): rows passed through"
        log.info("%s (%d rows)", note, len(records))
        path = write_jsonl(out_dir / "train.jsonl", records)
        return AugmentResult(records=records, added=0, path=path, note=note, report={"enabled": a.enabled, "plan": plan.__dict__})

    base_path = base_path or resolve_base_model(cfg.model.base).path
    base_model = None
    if a.generator.kind == "base" or a.score_rewrites:
        base_model, tokenizer = load_base(base_path, cfg.model.dtype)
    else:
        tokenizer = load_tokenizer(base_path)
    generator = generator or make_generator(cfg, base_path, base_model, tokenizer)
    embedder = Embedder()
    leakage = EvalLeakage(eval_records or [], cfg.validate_) if eval_records else None
    duplicates = DatasetDuplicates(context_records or records, cfg.validate_)
    budget = Budget(a.max_new_rows if max_new_rows is None else max_new_rows, a.max_seconds)
    labels = sorted({r["label"] for r in (context_records or records) if r.get("label") not in (None, "")})
    taken = {r["id"] for r in (context_records or records)}
    gold_rows = [r for r in records if (r.get("source") or GOLD) == GOLD]
    leak_dropped: list[dict[str, Any]] = []

    def reject(log_: TechniqueLog, parent: dict[str, Any], original: str, candidate: str, v: Verdict) -> None:
        log_.rejected.append({
            "technique": log_.name, "parent_id": parent["id"], "line": parent.get("line"), "rule": v.rule,
            "reason": v.reason, "prompt": _question(parent), "original": original, "candidate": candidate,
            "similarity": v.similarity,
        })

    def accept(log_: TechniqueLog, parent: dict[str, Any], original: str, row: dict[str, Any], candidate: str, v: Verdict) -> bool:
        """Leakage and budget, then keep. False when the row leaks."""
        why = leakage.reasons([row])[0] if leakage else None
        if why:
            v = Verdict(False, "leakage", why, v.similarity)
            reject(log_, parent, original, candidate, v)
            leak_dropped.append({"id": row["id"], "parent_id": parent["id"], "technique": log_.name, "reason": why})
            return False
        log_.kept.append({
            "technique": log_.name, "parent_id": parent["id"], "id": row["id"], "rule": v.rule, "reason": v.reason,
            "prompt": _question(parent), "original": original, "candidate": candidate, "similarity": v.similarity, "row": row,
        })
        budget.kept += 1
        return True

    steps: list[Iterator[None]] = []  # one per technique; their batches take turns (`_take_turns`)

    # Self-distillation ------------------------------------------------------------------------------------------
    outliers = set(plan.outlier_ids)
    sd = TechniqueLog(SELF_DISTILLED, plan.self_distill if not outliers else f"{plan.self_distill}; outliers replace")
    replaced: dict[str, dict[str, Any]] = {}
    added_after: dict[str, list[dict[str, Any]]] = {}
    if plan.self_distill != "off" or outliers:
        order = spread_order(gold_rows, outliers)
        if plan.self_distill == "off":
            order = [i for i in order if gold_rows[i]["id"] in outliers]
        elif a.self_distill_max_rows is not None:
            order = order[: max(a.self_distill_max_rows, sum(gold_rows[i]["id"] in outliers for i in order))]
        sd.rows_planned = len(order)
        gold_tokens = {i: _token_count(tokenizer, _answer(gold_rows[i])) for i in order}

        def sd_tokens(i: int) -> int:
            return min(a.max_new_tokens, math.ceil(gold_tokens[i] * a.self_distill_max_length_ratio) + a.length_slack_tokens)

        def sd_handle(batch: list[int], outs: list[list[Generated]]) -> None:
            cands = [(gold_rows[i], Generated(clean_generation(o[0].text), o[0].finished)) for i, o in zip(batch, outs)]
            sims = embedder.similarities([_answer(g) for g, _ in cands], [c.text or " " for _, c in cands])
            for i, (gold, cand), sim in zip(batch, cands, sims):
                counts = (gold_tokens[i], _token_count(tokenizer, cand.text))
                v = judge_rewrite(gold, cand, sim, a, labels, counts)
                if not v.kept:
                    reject(sd, gold, _answer(gold), cand.text, v)
                    continue
                mode = "replace" if gold["id"] in outliers else plan.self_distill
                row = with_answer(gold, cand.text, _unique_id(f"{gold['id']}#sd", taken))
                if mode == "add":
                    dup = duplicates.reason(row, new_question=False)
                    if dup:
                        reject(sd, gold, _answer(gold), cand.text, Verdict(False, "duplicate", dup, sim))
                        continue
                if budget.kept >= budget.max_new_rows:
                    budget.stopped = budget.stopped or "max_new_rows"
                    sd.over_budget += 1
                    continue
                if accept(sd, gold, _answer(gold), row, cand.text, v):
                    if mode == "replace":
                        replaced[gold["id"]] = row
                    else:
                        added_after.setdefault(gold["id"], []).append(row)
                        duplicates.add(row)

        steps.append(_batch_steps(
            "augment: self-distillation", order, lambda i: rewrite_conversation(gold_rows[i], a.self_distill_prompt), sd_tokens,
            generator, budget, batch_size=a.generator.batch_size, n=1, temperature=a.self_distill_temperature, seed=a.seed,
            handle=sd_handle, log_=sd, bar_position=0,
        ))

    # Paraphrases ------------------------------------------------------------------------------------------------
    pp = TechniqueLog(PARAPHRASE, f"n={plan.paraphrase_n}")
    if plan.paraphrase_n > 0:
        order = spread_order(gold_rows)
        if a.paraphrase.max_rows is not None:
            order = order[: a.paraphrase.max_rows]
        pp.rows_planned = len(order)
        q_tokens = {i: _token_count(tokenizer, _question(gold_rows[i])) for i in order}

        def pp_tokens(i: int) -> int:
            return min(a.max_new_tokens, math.ceil(q_tokens[i] * a.paraphrase.max_length_ratio) + a.length_slack_tokens)

        def pp_handle(batch: list[int], outs: list[list[Generated]]) -> None:
            cands = [(gold_rows[i], i, Generated(clean_generation(g.text, first_line=True), g.finished)) for i, o in zip(batch, outs) for g in o]
            texts = [c.text or " " for _, _, c in cands]
            sim_q = embedder.similarities([_question(g) for g, _, _ in cands], texts)
            sim_a = embedder.similarities([_answer(g) for g, _, _ in cands], texts)
            for (gold, i, cand), sq, sa in zip(cands, sim_q, sim_a):
                counts = (q_tokens[i], _token_count(tokenizer, cand.text))
                v = judge_paraphrase(gold, cand, sq, sa, a, counts)
                if not v.kept:
                    reject(pp, gold, _question(gold), cand.text, v)
                    continue
                row = with_question(gold, cand.text, _unique_id(f"{gold['id']}#p", taken))
                dup = duplicates.reason(row, new_question=True)
                if dup:
                    reject(pp, gold, _question(gold), cand.text, Verdict(False, "duplicate", dup, sq))
                    continue
                if budget.kept >= budget.max_new_rows:
                    budget.stopped = budget.stopped or "max_new_rows"
                    pp.over_budget += 1
                    continue
                if accept(pp, gold, _question(gold), row, cand.text, v):
                    duplicates.add(row)
                    added_after.setdefault(gold["id"], []).append(row)

        steps.append(_batch_steps(
            "augment: paraphrases", order, lambda i: paraphrase_conversation(gold_rows[i], a.paraphrase.prompt), pp_tokens,
            generator, budget, batch_size=max(1, a.generator.batch_size // max(1, plan.paraphrase_n)), n=plan.paraphrase_n,
            temperature=a.paraphrase.temperature, seed=a.seed, handle=pp_handle, log_=pp, bar_position=len(steps),
        ))
    _take_turns(steps)

    # Output rows: gold (or its replacing rewrite) followed by the rows added for it ------------------------------
    out_rows: list[dict[str, Any]] = []
    for r in records:
        out_rows.append(replaced.get(r["id"], r))
        out_rows.extend(added_after.get(r["id"], []))
    added = len(out_rows) - len(records)

    # Perplexity of kept rewrites against their gold rows -------------------------------------------------------------
    perplexity: dict[str, Any] = {"rows": 0}
    ppl_s = 0.0
    if a.score_rewrites and sd.kept and base_model is not None:
        began = time.perf_counter()
        by_id = {r["id"]: r for r in records}
        pairs = [(by_id[k["parent_id"]], k["row"]) for k in sd.kept]
        perplexity = rewrite_perplexity(pairs, base_model, tokenizer, cfg, read_gold_scores(scores_path))
        ppl_s = time.perf_counter() - began

    report = build_report(
        cfg, plan, generator.description, {SELF_DISTILLED: sd, PARAPHRASE: pp}, budget, perplexity, leak_dropped,
        rows_in=len(records), rows_out=len(out_rows), added=added, replaced=len(replaced),
        seconds={"generation": budget.generation_s, "perplexity": ppl_s, "total": time.perf_counter() - started},
        leakage_checked=leakage is not None,
    )
    path = write_jsonl(out_dir / "train.jsonl", out_rows)
    rejected_path = write_jsonl(out_dir / "rejected.jsonl", sd.rejected + pp.rejected)
    report_path, markdown_path = write_report(report, out_dir)
    log.info("augment: %s", report["note"])
    return AugmentResult(out_rows, added, path, report["note"], report, report_path, markdown_path, rejected_path)
