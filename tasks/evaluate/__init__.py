"""Evaluate the base model (baseline) and the tuned model on the same held-out rows.

What is measured, each for the baseline and the tuned model:

- **Task metrics** through local `evaluate` modules (`metrics/`): exact match, token F1, ROUGE-L and BLEU on generated
  answers; for classification (every eval row has a `label`) accuracy and macro precision, recall and F1 of the
  answer mapped to a label. Answers come from greedy decoding with fixed, recorded settings.
- **Paired bootstrap intervals** on every tuned-minus-baseline delta: the test rows are resampled with replacement
  (`evaluate.bootstrap_samples` times), both models' metric is recomputed on each resample from per-row statistics
  (corpus metrics such as BLEU and macro-F1 are recomputed, not averaged), and the percentile interval of the
  differences is reported at `evaluate.confidence`.
- **Over-memorization signal**: perplexity of the reference answers of the test rows. A tuned model whose test
  perplexity rises while its task metric looks fine has memorized its training rows rather than learned the task.
- **Forgetting**: perplexity of the general-ability probe answers, tuned relative to base, and a task metric on the
  probe answers (`evaluate.probe_metric`).
- **Memorization** by discoverable extraction: for training rows, the prompt plus the first part of the gold answer
  (`evaluate.memorization_prefix_fraction`) is given and the greedy continuation is compared with the rest of the
  answer. Exact extraction: the continuation reproduces the rest token for token. Near-verbatim: at least
  `evaluate.near_verbatim_agreement` of the rest's tokens are the model's greedy choice given the true text before
  them. Both are read from one teacher-forced forward pass (greedy decoding reproduces the rest exactly if and only
  if every next-token argmax along it is the gold token), so hundreds of rows cost about as much as scoring them.
  The same check on held-out test rows is the control: a model that learned the task completes held-out answers as
  well as trained ones; a model that memorized rows completes only the rows it saw.
- **Robustness**: test rows whose answer also appears in training under a different prompt are the *rephrased*
  rows; their metrics are reported separately, and the tuned model also answers the training prompt of the same
  answer (the *original* phrasing), so the gap between phrasings is measured on the same facts.

Task metrics, not training loss, decide whether the tuned model is better (the gate lives in tasks/register/).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import metrics as _metrics
from tasks.config import FewtuneConfig
from tasks.common.records import prompt_and_response, split_train_eval, write_jsonl
from tasks.common.models import assistant_spans, encode_chat, encode_prompt, load_model, load_tokenizer, pick_device, pick_dtype
from tasks.common.generation import generate_answers, generation_settings, load_tuned
from tasks.common.measure import (
    LOWER_IS_BETTER,
    METRICS,
    TASK_METRICS,
    Interval,
    Scored,
    bootstrap,
    check_primary_metric,
    compute_metrics,
    metric_aggregator,
    paired_delta,
    ppl_aggregate,
    ppl_items,
    score_answers,
    task_type,
    to_label,
)
from tasks.common.nll import token_nlls

log = logging.getLogger("fewtune.evaluate")



# ----------------------------------------------------------------------------------------------------------------
# Generation






# ----------------------------------------------------------------------------------------------------------------
# Task metrics with per-row statistics






















def _ppl(model, tokenizer, records: list[dict[str, Any]], cfg: FewtuneConfig, desc: str) -> Scored:
    encoded = [encode_chat(tokenizer, r, cfg.model.max_length) for r in records]
    items = ppl_items(token_nlls(model, tokenizer, encoded, cfg.score.batch_size, desc))
    return Scored(ppl_aggregate(items), items, ppl_aggregate)


# ----------------------------------------------------------------------------------------------------------------
# Bootstrap








def _delta_row(name: str, baseline: Scored, tuned: Scored, cfg: FewtuneConfig) -> dict[str, Any]:
    d = paired_delta(baseline, tuned, cfg)
    return {
        "metric": name,
        "n": len(baseline.items),
        "baseline": round(baseline.value, 4),
        "tuned": round(tuned.value, 4),
        "delta": round(d.value, 4),
        "low": round(d.low, 4),
        "high": round(d.high, 4),
        "higher_is_better": name not in LOWER_IS_BETTER,
    }


# ----------------------------------------------------------------------------------------------------------------
# Memorization: discoverable extraction, read from a teacher-forced pass


def _row_rank(record: dict[str, Any], seed: int) -> str:
    return hashlib.sha256(f"memorization:{seed}:{record['id']}".encode()).hexdigest()


def sample_rows(records: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """Up to `n` rows picked by a seeded hash of their ids (the same rows every run)."""
    return sorted(records, key=lambda r: _row_rank(r, seed))[:n]


@dataclass
class ExtractionCase:
    """One row prepared for the extraction check: the token ids up to the end of the part to reproduce."""

    id: str
    input_ids: list[int]
    prefix_end: int  # index of the first token to reproduce
    suffix_end: int  # one past the last token to reproduce


def extraction_case(tokenizer, record: dict[str, Any], cfg: FewtuneConfig) -> ExtractionCase | str:
    """The row's prompt + answer tokens split into the given prefix and the part to reproduce, or why it is skipped."""
    e = cfg.evaluate
    _, answer = prompt_and_response(record)
    full, spans = assistant_spans(tokenizer, record["messages"])
    start = spans[-1][0]
    if full[start : start + len(answer)] != answer:
        start = full.rfind(answer)
        if start < 0:
            return "the chat template changes the answer text"
    end = start + len(answer)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    positions = [i for i, (s, t) in enumerate(enc["offset_mapping"]) if start <= s < end and t > s]
    if len(positions) < 2:
        return "answer shorter than 2 tokens"
    first = positions[0]
    n = positions[-1] + 1 - first
    prefix = max(1, round(n * e.memorization_prefix_fraction))
    suffix = min(n - prefix, e.memorization_max_suffix_tokens)
    if suffix < e.memorization_min_suffix_tokens:
        return f"fewer than {e.memorization_min_suffix_tokens} answer tokens left to reproduce"
    stop = first + prefix + suffix
    if stop > cfg.model.max_length:
        return f"longer than model.max_length ({cfg.model.max_length} tokens)"
    return ExtractionCase(str(record["id"]), enc["input_ids"][:stop], first + prefix, stop)


def extraction_checks(
    model, tokenizer, cases: list[ExtractionCase], cfg: FewtuneConfig, desc: str
) -> list[dict[str, Any]]:
    """Per case: whether greedy decoding after the prefix reproduces the rest exactly, and the token agreement."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    order = sorted(range(len(cases)), key=lambda i: len(cases[i].input_ids), reverse=True)
    out: list[dict[str, Any]] = [{} for _ in cases]
    bs = cfg.score.batch_size
    model.eval()
    with torch.inference_mode(), tqdm(total=len(cases), desc=desc, unit="row", leave=False) as bar:
        for begin in range(0, len(order), bs):
            idx = order[begin : begin + bs]
            width = max(len(cases[i].input_ids) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(cases[i].input_ids)
                ids[row, :n] = torch.tensor(cases[i].input_ids)
                mask[row, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            guesses = logits.argmax(dim=-1).cpu()  # guesses[:, t] is the greedy choice for position t + 1
            for row, i in enumerate(idx):
                c = cases[i]
                gold = c.input_ids[c.prefix_end : c.suffix_end]
                guess = guesses[row, c.prefix_end - 1 : c.suffix_end - 1].tolist()
                hits = sum(g == t for g, t in zip(guess, gold))
                out[i] = {
                    "id": c.id,
                    "exact": hits == len(gold),
                    "agreement": round(hits / len(gold), 4),
                    "prefix": tokenizer.decode(c.input_ids[: c.prefix_end][-24:], skip_special_tokens=True),
                    "rest": tokenizer.decode(gold, skip_special_tokens=True),
                    "greedy": tokenizer.decode(guess, skip_special_tokens=True),
                }
            bar.update(len(idx))
    return out


def _rates(checks: list[dict[str, Any]], threshold: float) -> dict[str, float]:
    n = len(checks)
    return {
        "exact": round(sum(c["exact"] for c in checks) / n, 4) if n else float("nan"),
        "near_verbatim": round(sum(c["agreement"] >= threshold for c in checks) / n, 4) if n else float("nan"),
    }


def memorization_summary(
    checks: dict[str, dict[str, list[dict[str, Any]]]], cfg: FewtuneConfig, skipped: dict[str, dict[str, str]]
) -> dict[str, Any]:
    """Extraction rates per model and row set, and the excess: (tuned − base) on training rows minus on control rows.

    `checks[model][rows]`, model in baseline/tuned, rows in train/control, with the same rows for both models.
    """
    e = cfg.evaluate
    threshold = e.near_verbatim_agreement
    result: dict[str, Any] = {
        "prefix_fraction": e.memorization_prefix_fraction,
        "max_suffix_tokens": e.memorization_max_suffix_tokens,
        "near_verbatim_agreement": threshold,
        "method": "teacher-forced greedy check: exact = greedy continuation reproduces the rest token for token",
        "rows": {k: len(v) for k, v in checks["tuned"].items()},
        "skipped": {k: len(v) for k, v in skipped.items()},
        "skipped_reasons": sorted({why for v in skipped.values() for why in v.values()}),
    }
    for model in ("baseline", "tuned"):
        result[model] = {rows: _rates(c, threshold) for rows, c in checks[model].items()}
    n_train, n_ctrl = len(checks["tuned"]["train"]), len(checks["tuned"]["control"])
    for kind in ("exact", "near_verbatim"):

        def hit(model: str, rows: str, i: int, kind: str = kind) -> float:
            c = checks[model][rows][i]
            return float(c["exact"] if kind == "exact" else c["agreement"] >= threshold)

        def stat(idx: list[Sequence[int]], hit=hit) -> float:
            tr = [hit("tuned", "train", i) - hit("baseline", "train", i) for i in idx[0]]
            ct = [hit("tuned", "control", i) - hit("baseline", "control", i) for i in idx[1]]
            return sum(tr) / len(tr) - sum(ct) / len(ct)

        if n_train and n_ctrl:
            result[f"excess_{kind}"] = bootstrap(
                stat, [n_train, n_ctrl], e.bootstrap_samples, e.confidence, e.bootstrap_seed
            ).to_dict()
        else:
            result[f"excess_{kind}"] = None
    result["examples"] = [
        {"id": b["id"], "prefix": b["prefix"], "rest": b["rest"], "baseline": b["greedy"], "tuned": t["greedy"],
         "tuned_exact": t["exact"], "baseline_exact": b["exact"]}
        for b, t in zip(checks["baseline"]["train"][: e.examples_in_summary], checks["tuned"]["train"][: e.examples_in_summary])
    ]
    return result


# ----------------------------------------------------------------------------------------------------------------
# Robustness: rephrased test prompts


def _text_key(text: str) -> str:
    return " ".join(text.casefold().split())


def rephrase_groups(
    records: list[dict[str, Any]], trained: list[dict[str, Any]]
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Each test row's group and, for rephrased rows, a training row with the same answer (its original phrasing).

    seen: the test prompt is also a training prompt; rephrased: its answer is a training answer but its prompt is
    new; novel: the answer is not in the training rows.
    """
    by_answer: dict[str, dict[str, Any]] = {}
    prompts: set[str] = set()
    for r in trained:
        p, a = prompt_and_response(r)
        by_answer.setdefault(_text_key(a), r)
        prompts.add(_text_key(p[-1]["content"]) if p else "")
    groups, originals = {}, {}
    for r in records:
        p, a = prompt_and_response(r)
        if (_text_key(p[-1]["content"]) if p else "") in prompts:
            groups[r["id"]] = "seen"
        elif _text_key(a) in by_answer:
            groups[r["id"]] = "rephrased"
            originals[r["id"]] = by_answer[_text_key(a)]
        else:
            groups[r["id"]] = "novel"
    return groups, originals


def rows_trained_on(train_records: list[dict[str, Any]], cfg: FewtuneConfig) -> list[dict[str, Any]]:
    """The training rows the adapter learned from: the train stage holds `train.validation_fraction` out (same split)."""
    trained, _ = split_train_eval(train_records, cfg.train.validation_fraction, cfg.train.seed)
    return trained


# ----------------------------------------------------------------------------------------------------------------
# The evaluation


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




def _scores_dict(scored: dict[str, Scored]) -> dict[str, float]:
    return {k: round(float(s.value), 4) for k, s in scored.items()}


def _subset(scored: Scored, index: list[int]) -> Scored:
    items = [scored.items[i] for i in index]
    return Scored(scored.aggregate(items), items, scored.aggregate)


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

    tokenizer = load_tokenizer(base_path)
    mem_cases: dict[str, list[ExtractionCase]] = {}
    skipped: dict[str, dict[str, str]] = {}
    if train_records and e.memorization_rows:
        for name, rows in (("train", trained), ("control", records)):
            mem_cases[name], skipped[name] = [], {}
            for r in sample_rows(rows, e.memorization_rows, e.bootstrap_seed):
                case = extraction_case(tokenizer, r, cfg)
                if isinstance(case, str):
                    skipped[name][str(r["id"])] = case
                else:
                    mem_cases[name].append(case)
        if not (mem_cases["train"] and mem_cases["control"]):
            mem_cases = {}

    device = pick_device()
    dtype = pick_dtype(cfg.model.dtype, device)
    model = load_model(base_path, dtype=dtype, device=device)

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
        answers[label] = timed("generation", generate_answers, model, tokenizer, prompts, cfg, f"evaluate: {label} answers")
        scored[label] = score_answers(task, answers[label], gold, labels)
        eval_ppl[label] = timed("perplexity", _ppl, model, tokenizer, records, cfg, f"evaluate: {label} ppl")
        if probe:
            probe_ppl[label] = timed("perplexity", _ppl, model, tokenizer, probe, cfg, f"evaluate: {label} probe ppl")
            if e.probe_generate:
                probe_answers[label] = timed(
                    "generation", generate_answers, model, tokenizer, probe_prompts, cfg, f"evaluate: {label} probe answers"
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
                cfg,
                "evaluate: tuned answers to original phrasings",
            )
        log.info("%s: %s", label, _scores_dict(scored[label]))
    del model

    baseline = {**_scores_dict(scored["baseline"]), "eval_ppl": round(eval_ppl["baseline"].value, 4)}
    tuned = {**_scores_dict(scored["tuned"]), "eval_ppl": round(eval_ppl["tuned"].value, 4)}
    intervals = {k: _delta_row(k, scored["baseline"][k], scored["tuned"][k], cfg) for k in scored["tuned"]}
    intervals["eval_ppl"] = _delta_row("eval_ppl", eval_ppl["baseline"], eval_ppl["tuned"], cfg)

    over = intervals["eval_ppl"]
    ratio = paired_delta(eval_ppl["baseline"], eval_ppl["tuned"], cfg, relative=True)
    rose = over["low"] > 0
    overmemorization = {
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

    forgetting = None
    if probe:
        baseline["probe_ppl"] = round(probe_ppl["baseline"].value, 4)
        tuned["probe_ppl"] = round(probe_ppl["tuned"].value, 4)
        intervals["probe_ppl"] = _delta_row("probe_ppl", probe_ppl["baseline"], probe_ppl["tuned"], cfg)
        forgetting = {
            "probe_rows": len(probe),
            "baseline_ppl": baseline["probe_ppl"],
            "tuned_ppl": tuned["probe_ppl"],
            "relative_increase": paired_delta(probe_ppl["baseline"], probe_ppl["tuned"], cfg, relative=True).to_dict(),
            "metric": None,
        }
        if probe_scored:
            key = f"probe_{e.probe_metric}"
            baseline[key] = round(probe_scored["baseline"].value, 4)
            tuned[key] = round(probe_scored["tuned"].value, 4)
            intervals[key] = _delta_row(key, probe_scored["baseline"], probe_scored["tuned"], cfg)
            forgetting["metric"] = intervals[key]

    memorization = memorization_summary(mem_checks, cfg, skipped) if mem_checks else None
    if memorization is None and train_records:
        why = sorted({w for v in skipped.values() for w in v.values()}) or ["evaluate.memorization_rows is 0"]
        memorization = {"skipped_reasons": why, "rows": {k: len(v) for k, v in mem_cases.items()}}

    robustness: dict[str, Any] = {"groups": {}, "original_vs_rephrased": None}
    for group in ("seen", "rephrased", "novel"):
        index = [i for i, r in enumerate(records) if groups.get(r["id"]) == group]
        if not index:
            continue
        robustness["groups"][group] = {
            "n": len(index),
            "metrics": {
                k: _delta_row(k, _subset(scored["baseline"][k], index), _subset(scored["tuned"][k], index), cfg)
                for k in scored["tuned"]
            },
        }
    if original_answers:
        positions = {r["id"]: i for i, r in enumerate(records)}
        index = [positions[i] for i in original_ids]
        orig_gold = [str(originals[i]["label"]) if task == "classification" else prompt_and_response(originals[i])[1] for i in original_ids]
        primary = e.primary_metric
        on_original = score_answers(task, original_answers, orig_gold, labels)[primary]
        on_rephrased = _subset(scored["tuned"][primary], index)
        gap = paired_delta(on_rephrased, on_original, cfg)
        robustness["original_vs_rephrased"] = {
            "metric": primary,
            "n": len(index),
            "original": round(on_original.value, 4),
            "rephrased": round(on_rephrased.value, 4),
            "gap": gap.to_dict(),
            "note": "tuned model on the training phrasing minus on the rephrased test prompt of the same answer",
        }

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
        generation=generation_settings(cfg, str(dtype).removeprefix("torch.")),
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


__all__ = [
    "EvalResult",
    "Interval",
    "Scored",
    "bootstrap",
    "compute_metrics",
    "evaluate_models",
    "extraction_case",
    "extraction_checks",
    "generate_answers",
    "load_tuned",
    "metric_aggregator",
    "paired_delta",
    "rephrase_groups",
    "score_answers",
    "to_label",
]
