"""The evaluation: baseline and tuned model on the same held-out rows, and the typed result it returns."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.common.generation import generate_answers, generation_settings, load_tuned, settings_from
from tasks.common.measure import Scored, check_primary_metric, paired_delta, score_answers, task_type
from tasks.common.models import load_base
from tasks.common.records import prompt_and_response, write_jsonl
from tasks.config import FewtuneConfig
from tasks.evaluate.deltas import delta_row, ppl_scored, scores_dict
from tasks.evaluate.memorization import ExtractionCase, extraction_cases, extraction_checks, memorization_result
from tasks.evaluate.robustness import rephrase_groups, robustness_summary, rows_trained_on

log = logging.getLogger("fewtune.evaluate")


@dataclass
class EvalResult:
    baseline: dict[str, float]
    tuned: dict[str, float]
    primary_metric: str
    n_examples: int
    task: str = "generation"
    generation: dict[str, Any] = field(default_factory=dict)
    bootstrap: dict[str, Any] = field(default_factory=dict)
    intervals: dict[str, dict[str, Any]] = field(default_factory=dict)
    overmemorization: dict[str, Any] = field(default_factory=dict)
    forgetting: dict[str, Any] | None = None
    memorization: dict[str, Any] | None = None
    robustness: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    predictions_path: str | None = None

    @property
    def gain(self) -> float:
        return round(self.tuned[self.primary_metric] - self.baseline[self.primary_metric], 4)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gain"] = self.gain
        return data


def _overmemorization(eval_ppl: dict[str, Scored], over: dict[str, Any], cfg: FewtuneConfig) -> dict[str, Any]:
    """Test perplexity of the reference answers, tuned vs base: a rise flags memorized rows, not a learned task."""
    ratio = paired_delta(eval_ppl["baseline"], eval_ppl["tuned"], cfg, relative=True)
    rose = over["low"] > 0
    return {
        "baseline_eval_ppl": over["baseline"],
        "tuned_eval_ppl": over["tuned"],
        "relative_change": ratio.to_dict(),
        "flag": rose,
        "note": (
            "test perplexity of the reference answers rose after fine-tuning (interval above 0): the model may have "
            "memorized its training rows instead of learning the task, even where task metrics look fine"
            if rose
            else "test perplexity of the reference answers did not rise: no sign of over-memorization"
        ),
    }


def _forgetting(
    probe_rows: int,
    probe_ppl: dict[str, Scored],
    probe_scored: dict[str, Scored],
    values: dict[str, dict[str, float]],
    intervals: dict[str, dict[str, Any]],
    cfg: FewtuneConfig,
) -> dict[str, Any]:
    """Probe perplexity (and the probe metric) tuned vs base; adds their values and intervals to the results."""
    baseline, tuned = values["baseline"], values["tuned"]
    baseline["probe_ppl"] = round(probe_ppl["baseline"].value, 4)
    tuned["probe_ppl"] = round(probe_ppl["tuned"].value, 4)
    intervals["probe_ppl"] = delta_row("probe_ppl", probe_ppl["baseline"], probe_ppl["tuned"], cfg)
    forgetting = {
        "probe_rows": probe_rows,
        "baseline_ppl": baseline["probe_ppl"],
        "tuned_ppl": tuned["probe_ppl"],
        "relative_increase": paired_delta(probe_ppl["baseline"], probe_ppl["tuned"], cfg, relative=True).to_dict(),
        "metric": None,
    }
    if probe_scored:
        key = f"probe_{cfg.evaluate.probe_metric}"
        baseline[key] = round(probe_scored["baseline"].value, 4)
        tuned[key] = round(probe_scored["tuned"].value, 4)
        intervals[key] = delta_row(key, probe_scored["baseline"], probe_scored["tuned"], cfg)
        forgetting["metric"] = intervals[key]
    return forgetting


def evaluate_models(
    records: list[dict[str, Any]],
    probe: list[dict[str, Any]] | None,
    cfg: FewtuneConfig,
    base_path: str,
    adapter_path: str,
    out_dir: Path,
    train_records: list[dict[str, Any]] | None = None,
) -> EvalResult:
    """Baseline vs tuned on `records`; writes `out_dir/predictions.jsonl` (every prompt, both answers, row scores).

    `probe`: general-ability rows for the forgetting check. `train_records`: the rows the train stage received
    (for the memorization check and the original phrasings of rephrased test rows); without them both are skipped.
    """
    e = cfg.evaluate
    settings = settings_from(cfg)
    started = time.perf_counter()
    seconds: dict[str, float] = {"generation": 0.0, "perplexity": 0.0, "memorization": 0.0, "robustness": 0.0}

    def timed(part: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[part] += time.perf_counter() - t0

    if e.max_examples:
        records = records[: e.max_examples]
    task = task_type(records, cfg)
    check_primary_metric(task, cfg)
    prompts, refs = zip(*(prompt_and_response(r) for r in records))
    prompts, refs = list(prompts), list(refs)
    labels = sorted({str(r["label"]) for r in records}) if task == "classification" else None
    gold = [str(r["label"]) for r in records] if task == "classification" else refs

    trained = rows_trained_on(train_records, cfg) if train_records else []
    groups, originals = rephrase_groups(records, trained)
    probe = probe or []
    probe_prompts, probe_refs = ([list(x) for x in zip(*(prompt_and_response(r) for r in probe))] if probe else ([], []))

    model, tokenizer = load_base(base_path, cfg.model.dtype)
    dtype = str(model.dtype).removeprefix("torch.")
    mem_cases: dict[str, list[ExtractionCase]] = {}
    skipped: dict[str, dict[str, str]] = {}
    if train_records and e.memorization_rows:
        mem_cases, skipped = extraction_cases(tokenizer, {"train": trained, "control": records}, cfg)

    answers: dict[str, list[str]] = {}
    scored: dict[str, dict[str, Scored]] = {}
    eval_ppl: dict[str, Scored] = {}
    probe_ppl: dict[str, Scored] = {}
    probe_scored: dict[str, Scored] = {}
    probe_answers: dict[str, list[str]] = {}
    mem_checks: dict[str, dict[str, list[dict[str, Any]]]] = {}
    original_answers: list[str] = []
    original_ids = [r["id"] for r in records if r["id"] in originals] if e.robustness_original else []

    for label in ("baseline", "tuned"):
        if label == "tuned":
            model = load_tuned(model, adapter_path)
        answers[label] = timed("generation", generate_answers, model, tokenizer, prompts, settings, f"evaluate: {label} answers")
        scored[label] = score_answers(task, answers[label], gold, labels)
        eval_ppl[label] = timed("perplexity", ppl_scored, model, tokenizer, records, cfg, f"evaluate: {label} ppl")
        if probe:
            probe_ppl[label] = timed("perplexity", ppl_scored, model, tokenizer, probe, cfg, f"evaluate: {label} probe ppl")
            if e.probe_generate:
                probe_answers[label] = timed(
                    "generation", generate_answers, model, tokenizer, probe_prompts, settings, f"evaluate: {label} probe answers"
                )
                probe_scored[label] = score_answers("generation", probe_answers[label], probe_refs)[e.probe_metric]
        if mem_cases:
            mem_checks[label] = {
                rows: timed("memorization", extraction_checks, model, tokenizer, cases, cfg, f"evaluate: {label} {rows} extraction")
                for rows, cases in mem_cases.items()
            }
        if label == "tuned" and original_ids:
            original_answers = timed(
                "robustness",
                generate_answers,
                model,
                tokenizer,
                [prompt_and_response(originals[i])[0] for i in original_ids],
                settings,
                "evaluate: tuned answers to original phrasings",
            )
        log.info("%s: %s", label, scores_dict(scored[label]))
    del model

    baseline = {**scores_dict(scored["baseline"]), "eval_ppl": round(eval_ppl["baseline"].value, 4)}
    tuned = {**scores_dict(scored["tuned"]), "eval_ppl": round(eval_ppl["tuned"].value, 4)}
    intervals = {k: delta_row(k, scored["baseline"][k], scored["tuned"][k], cfg) for k in scored["tuned"]}
    intervals["eval_ppl"] = delta_row("eval_ppl", eval_ppl["baseline"], eval_ppl["tuned"], cfg)
    overmemorization = _overmemorization(eval_ppl, intervals["eval_ppl"], cfg)
    values = {"baseline": baseline, "tuned": tuned}
    forgetting = _forgetting(len(probe), probe_ppl, probe_scored, values, intervals, cfg) if probe else None
    memorization = memorization_result(mem_checks, mem_cases, skipped, cfg) if train_records else None
    robustness = robustness_summary(
        records, groups, scored, cfg, task=task, labels=labels,
        originals=originals, original_ids=original_ids, original_answers=original_answers,
    )

    rows = []
    for i, (r, prompt, ref) in enumerate(zip(records, prompts, refs)):
        rows.append(
            {
                "id": r["id"],
                "prompt": prompt[-1]["content"] if prompt else "",
                "reference": ref,
                "baseline": answers["baseline"][i],
                "tuned": answers["tuned"][i],
                "group": groups.get(r["id"], "novel"),
                "scores": {m: {k: s.items[i] for k, s in scored[m].items()} for m in ("baseline", "tuned")},
                "eval_nll": {m: list(eval_ppl[m].items[i]) for m in ("baseline", "tuned")},
            }
        )
    out_dir = Path(out_dir)
    pred_path = write_jsonl(out_dir / "predictions.jsonl", rows)
    if probe_answers:
        write_jsonl(
            out_dir / "probe_predictions.jsonl",
            [
                {"id": r["id"], "prompt": p[-1]["content"], "reference": ref, "baseline": b, "tuned": t}
                for r, p, ref, b, t in zip(probe, probe_prompts, probe_refs, probe_answers["baseline"], probe_answers["tuned"])
            ],
        )
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    seconds["total"] = round(time.perf_counter() - started, 1)
    examples = [{k: row[k] for k in ("id", "prompt", "reference", "baseline", "tuned", "group")} for row in rows]
    return EvalResult(
        baseline=baseline,
        tuned=tuned,
        primary_metric=e.primary_metric,
        n_examples=len(records),
        task=task,
        generation=generation_settings(cfg, dtype),
        bootstrap={"samples": e.bootstrap_samples, "confidence": e.confidence, "seed": e.bootstrap_seed, "method": "percentile"},
        intervals=intervals,
        overmemorization=overmemorization,
        forgetting=forgetting,
        memorization=memorization,
        robustness=robustness,
        seconds=seconds,
        examples=examples[: e.examples_in_summary],
        predictions_path=str(pred_path),
    )
