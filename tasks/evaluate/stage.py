"""The evaluation: baseline and tuned model on the same held-out rows, and the typed result it returns."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tasks.common.general_probe import GeneralProbe, answer_is_right, load_general_probe
from tasks.common.generation import generate_pooled, generation_settings, settings_from
from tasks.common.judge import judge_scores
from tasks.common.labels import label_set
from tasks.common.measure import (
    Scored,
    check_primary_metric,
    resolve_primary_metric,
    score_answers,
    task_type,
)
from tasks.common.models import encode_chat, load_base
from tasks.common.records import prompt_and_response
from tasks.common.twin import adapted_from_layer, twin_of
from tasks.config import FewtuneConfig
from tasks.evaluate.baseline_cache import BaselineCache
from tasks.evaluate.deltas import delta_row, overmemorization_signal, scores_dict
from tasks.evaluate.forgetting import (
    answered,
    forgetting_result,
    general_encodings,
    paired_ppl,
    ppl_of,
    unmerged_tuned,
)
from tasks.evaluate.labelled import (
    BASELINE_NAMES,
    baseline_table,
    calibration,
    fit_k_shot,
    k_shot_examples,
    k_shot_prompt,
    predict_labels,
    tfidf_lr,
    worth_it,
)
from tasks.evaluate.memorization import (
    ExtractionCase,
    clean_control,
    extraction_cases,
    extraction_checks,
    memorization_plan,
    memorization_result,
    paired_memorization,
)
from tasks.evaluate.outputs import prediction_rows, write_outputs
from tasks.evaluate.paired import kl_items
from tasks.evaluate.robustness import rephrase_groups, robustness_summary, rows_trained_on

log = logging.getLogger("fewtune.evaluate")
ASKED = {"answers": "test prompts", "general_answers": "general questions", "originals": "original phrasings"}


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
    labels: list[str] | None = None
    baselines: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    worth_it: str | None = None
    baseline_cache: dict[str, Any] | None = None

    @property
    def gain(self) -> float:
        return round(self.tuned[self.primary_metric] - self.baseline[self.primary_metric], 4)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gain"] = self.gain
        return data


def _probe_rows(general: GeneralProbe, cfg: FewtuneConfig) -> GeneralProbe:
    n = cfg.evaluate.probe_max_rows
    if not n:
        return general
    return GeneralProbe(prose=general.prose[:n], questions=general.questions[:n], extra=general.extra[:n])


def evaluate_models(
    records: list[dict[str, Any]],
    general: GeneralProbe | None,
    cfg: FewtuneConfig,
    base_path: str,
    adapter_path: str,
    out_dir: Path,
    train_records: list[dict[str, Any]] | None = None,
    validation_records: list[dict[str, Any]] | None = None,
    labels: list[str] | None = None,
    baseline_cache: BaselineCache | None = None,
) -> EvalResult:
    """Baseline vs tuned on `records`; writes `out_dir/predictions.jsonl` (every prompt, both answers, row scores) and
    `out_dir/probe_predictions.jsonl` (the general questions, both answers, right or wrong).

    `general`: the general-ability probe for the forgetting signals (None: the probe shipped with fewtune).
    `train_records`: the rows the train stage received (original phrasings of rephrased test rows, memorization);
    `validation_records`: the slice of them held out of training, the memorization control.
    `labels`: labelled data's label set (the validate stage's; None: the labels of the rows). Labelled data is
    answered by label scoring (a prediction is always a label), with calibration and the fair baselines.
    `baseline_cache`: where the base model's side is kept between runs (None: computed every time).
    """
    e = cfg.evaluate
    settings = settings_from(cfg)
    probe_settings = replace(settings, max_new_tokens=e.probe_max_new_tokens)
    started = time.perf_counter()
    seconds: dict[str, float] = {"generation": 0.0, "perplexity": 0.0, "forgetting": 0.0, "memorization": 0.0,
                                 "robustness": 0.0}

    def timed(part: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[part] += time.perf_counter() - t0

    if e.max_examples:
        records = records[: e.max_examples]
    task = task_type(records, cfg)
    primary = resolve_primary_metric(task, records, cfg)
    check_primary_metric(task, cfg, primary)
    prompts, refs = zip(*(prompt_and_response(r) for r in records))
    prompts, refs = list(prompts), list(refs)
    labelled = task == "classification"
    if labelled and not labels:
        labels = label_set(cfg, train_records or [], records)
    labels = list(labels) if labelled and labels else None
    gold = [str(r["label"]) for r in records] if labelled else refs

    held_out = {str(r["id"]) for r in validation_records or []}
    if train_records and validation_records is not None:
        trained = [r for r in train_records if str(r["id"]) not in held_out]
    else:
        trained = rows_trained_on(train_records, cfg) if train_records else []
    groups, originals = rephrase_groups(records, trained)
    general = _probe_rows(general if general is not None else load_general_probe(), cfg)
    general_prompts = [prompt_and_response(r)[0] for r in general.questions + general.extra]
    general_refs = [prompt_and_response(r)[1] for r in general.questions + general.extra]
    aliases = [list(r["answers"]) for r in general.questions]

    model, tokenizer = load_base(base_path, cfg.model.dtype)
    dtype = str(model.dtype).removeprefix("torch.")
    general_encoded = general_encodings(tokenizer, general.prose, general.extra, cfg.model.max_length)
    control = clean_control(validation_records, trained)
    memorization_why = memorization_plan(task, trained, validation_records, control, cfg)
    mem_cases: dict[str, list[ExtractionCase]] = {}
    skipped: dict[str, dict[str, str]] = {}
    if memorization_why is None:
        mem_cases, skipped = extraction_cases(tokenizer, {"train": trained, "control": control}, cfg)

    answers: dict[str, list[str]] = {}
    scored: dict[str, dict[str, Scored]] = {}
    eval_ppl: dict[str, Scored] = {}
    general_ppl: dict[str, Scored] = {}
    general_answers: dict[str, list[str]] = {}
    kl: dict[str, list[tuple[float, int]]] = {}
    mem_checks: dict[str, dict[str, list[dict[str, Any]]]] = {}
    original_answers: list[str] = []
    original_ids = [r["id"] for r in records if r["id"] in originals] if e.robustness_original else []
    # each training row once, however many test rows share it as their original phrasing
    unique_originals = {str(originals[i]["id"]): originals[i] for i in original_ids}
    label_scores: dict[str, Any] = {}
    baseline_predictions: dict[str, list[str]] = {}
    notes: dict[str, str] = {}

    def answer_all(model, asked: list[list[dict[str, str]]], desc: str, key: str | None = None) -> list[str]:
        """Labelled data: the label of highest likelihood (greedy answers come from `pooled_answers`)."""
        assert labels is not None
        found = timed("generation", predict_labels, model, tokenizer, asked, labels, cfg, desc)
        if key:
            label_scores[key] = found
        return found.predictions()

    cache = baseline_cache or BaselineCache(None, "")

    def kept(part: str, inputs: Any, fn, *args):
        """The baseline's `fn(*args)` through the cache (keyed by `inputs`); the tuned model's always computed."""
        return cache.get(part, [inputs, dtype], lambda: fn(*args)) if label == "baseline" else fn(*args)

    # Perplexities: with an adapter above the lowest layers, the base model's are computed beside the tuned model's
    # (one pass per batch, the layers below the adapter once) unless stored from an earlier run.
    beside_tuned = adapted_from_layer(adapter_path) > 0
    ppl_parts = [("eval_ppl", eval_ppl, records, lambda: [encode_chat(tokenizer, r, cfg.model.max_length) for r in records],
                  "perplexity", "ppl"),
                 ("general_ppl", general_ppl, general_encoded, lambda: general_encoded, "forgetting", "general-text ppl")]

    def answer_and_scores(model, asked, desc):
        return answer_all(model, asked, desc, label), label_scores.get(label)

    def pooled_answers(model) -> dict[str, list[str]]:
        """The model's greedy answers from one decoding (`generate_pooled`): to the general questions, and for
        generation tasks to the test prompts and (the tuned model) to the original phrasings; the base model's read
        back from the cache where stored."""
        jobs: dict[str, tuple[Any, Any, Any]] = {}
        if labels is None:
            jobs["answers"] = ([prompts, labels, settings], prompts, settings)
        jobs["general_answers"] = ([general_prompts, probe_settings], general_prompts, probe_settings)
        if labels is None and label == "tuned" and unique_originals:
            jobs["originals"] = (None, [prompt_and_response(u)[0] for u in unique_originals.values()], settings)
        got: dict[str, list[str]] = {}
        for part, (inputs, _, _) in jobs.items():
            found = cache.find(part, [inputs, dtype]) if label == "baseline" else None
            if found is not None:  # stored answers to test prompts are (answers, label scores)
                got[part] = found[0][0] if part == "answers" else found[0]
        todo = [part for part in jobs if part not in got]
        if todo:
            said = timed("generation", generate_pooled, model, tokenizer, [jobs[part][1:] for part in todo],
                         f"evaluate: {label} answers ({', '.join(ASKED[part] for part in todo)})")
            for part, these in zip(todo, said):
                got[part] = these
                if label == "baseline":
                    cache.put(part, [jobs[part][0], dtype], (these, None) if part == "answers" else these)
        return got

    for label in ("baseline", "tuned"):
        if label == "tuned":
            # The tuned model beside the base model's own copies of the layers the adapter changes: both models'
            # next-token distributions, the layers below the adapter run once for both.
            twin = twin_of(unmerged_tuned(model, adapter_path))
            if labels is None:  # labelled data: moving the label distribution on task prompts is the task itself
                kl["task"] = timed("forgetting", kl_items, twin, tokenizer,
                                   answered(prompts, answers["baseline"], refs), cfg, "evaluate: KL on task prompts")
            kl["general"] = timed("forgetting", kl_items, twin, tokenizer,
                                  answered(general_prompts, general_answers["baseline"], general_refs), cfg,
                                  "evaluate: KL on general prompts")
            for part, store, rows, encoded, kind, what in ppl_parts:
                if "baseline" not in store:  # not stored: both models' from one pass, the base's stored
                    got = timed(kind, paired_ppl, twin, tokenizer, encoded(), cfg, f"evaluate: baseline and tuned {what}")
                    if got is None:
                        with twin.base():
                            got = (timed(kind, ppl_of, twin.model, tokenizer, encoded(), cfg, f"evaluate: baseline {what}"),)
                    store["baseline"] = cache.put(part, [rows, dtype], got[0])
                    store.update(dict(zip(["tuned"], got[1:])))
            if mem_cases and all(mem_cases.values()) and "baseline" not in mem_checks:  # both from one pass each
                mem_checks.update(timed("memorization", paired_memorization, twin, tokenizer, mem_cases, cfg, cache,
                                        dtype))
            model = twin.merged()
        pooled = pooled_answers(model)
        general_answers[label] = pooled["general_answers"]
        if labels is None:
            answers[label] = pooled["answers"]
        else:
            answers[label], label_scores[label] = kept("answers", [prompts, labels, settings], answer_and_scores, model,
                                                       prompts, f"evaluate: {label} answers")
        if label == "baseline" and labels is not None and "k_shot" in e.baselines and trained:
            room = min(e.k_shot_max_tokens, getattr(model.config, "max_position_embeddings", None) or e.k_shot_max_tokens)
            shown = fit_k_shot(tokenizer, prompts, k_shot_examples(trained, labels, e.k_shot_per_label, e.bootstrap_seed),
                               labels, room)
            notes["k_shot"] = BASELINE_NAMES["k_shot"].format(k=e.k_shot_per_label) + f": {len(shown)} examples shown"
            if shown:  # none fits: a second zero-shot, not a k-shot baseline
                baseline_predictions["k_shot"] = kept("k_shot", [prompts, shown, labels, room], lambda m: timed(
                    "generation", predict_labels, m, tokenizer, [k_shot_prompt(p, shown) for p in prompts], labels,
                    cfg, "evaluate: k-shot baseline", room,
                ).predictions(), model)
        scored[label] = score_answers(task, answers[label], gold, labels)
        if e.judge.enabled and task == "generation":
            scored[label]["judge"] = kept("judge", [prompts, answers[label], refs, e.judge], timed, "generation",
                                          judge_scores, [p[-1]["content"] for p in prompts], answers[label], refs, cfg)
        for part, store, rows, encoded, kind, what in ppl_parts:
            if label == "baseline" and beside_tuned:  # stored, else computed beside the tuned model's
                stored = cache.find(part, [rows, dtype])
                if stored is not None:
                    store[label] = stored[0]
            elif label not in store:
                store[label] = kept(part, rows, timed, kind, ppl_of, model, tokenizer, encoded(), cfg,
                                    f"evaluate: {label} {what}")
        if label == "baseline" and beside_tuned and mem_cases and all(mem_cases.values()):
            stored = cache.find("memorization", [mem_cases, dtype])  # stored, else checked beside the tuned model
            if stored is not None:
                mem_checks[label] = stored[0]
        elif mem_cases and all(mem_cases.values()) and label not in mem_checks:
            mem_checks[label] = kept("memorization", mem_cases, lambda m: {
                rows: timed("memorization", extraction_checks, m, tokenizer, cases, cfg, f"evaluate: {label} {rows} extraction")
                for rows, cases in mem_cases.items()
            }, model)
        if label == "tuned" and original_ids:
            said = dict(zip(unique_originals, pooled["originals"] if labels is None else answer_all(
                model, [prompt_and_response(u)[0] for u in unique_originals.values()],
                "evaluate: tuned answers to original phrasings")))
            original_answers = [said[str(originals[i]["id"])] for i in original_ids]
        log.info("%s: %s", label, scores_dict(scored[label]))
    del model

    baseline = {**scores_dict(scored["baseline"]), "eval_ppl": round(eval_ppl["baseline"].value, 4)}
    tuned = {**scores_dict(scored["tuned"]), "eval_ppl": round(eval_ppl["tuned"].value, 4)}
    intervals = {k: delta_row(k, scored["baseline"][k], scored["tuned"][k], cfg) for k in scored["tuned"]}
    intervals["eval_ppl"] = delta_row("eval_ppl", eval_ppl["baseline"], eval_ppl["tuned"], cfg)
    overmemorization = overmemorization_signal(eval_ppl, intervals["eval_ppl"], cfg)
    right = {m: [answer_is_right(a, al) for a, al in zip(general_answers[m], aliases)] for m in ("baseline", "tuned")}
    forgetting = forgetting_result(general, general_ppl, kl, right, cfg, not_applicable={
        "kl_task": "labelled data: the answers on task prompts are labels, and moving their distribution is what the "
                   "fine-tune is for; forgetting is read on the general prompts (kl_general, general_ppl, flips)"}
        if labels is not None else None)
    robustness = robustness_summary(
        records, groups, scored, cfg, task=task, labels=labels, primary=primary,
        originals=originals, original_ids=original_ids, original_answers=original_answers,
    )
    if memorization_why is None:
        memorization = memorization_result(mem_checks, mem_cases, skipped, cfg)
    else:
        memorization = dict(memorization_why)
    repeated = len(validation_records or []) - len(control)
    memorization["control"] = (f"{len(control)} rows of the training data held out of training (validation slice) whose "
                               f"answers are not trained" + (f"; {repeated} held-out rows repeating a trained answer left "
                                                             "out" if repeated else ""))
    memorization["generalization_gap"] = robustness.get("original_vs_rephrased")

    baselines = calibrated = verdict = None
    if labels is not None:
        if "zero_shot" in e.baselines:
            baseline_predictions = {"zero_shot": answers["baseline"], **baseline_predictions}
        if "tfidf_lr" in e.baselines and trained:
            baseline_predictions["tfidf_lr"] = timed("generation", tfidf_lr, trained, records, labels, e.tfidf_c)
        order = [n for n in e.baselines if n in baseline_predictions]
        missing = {n: ("no example fits evaluate.k_shot_max_tokens (or the model's context)" if n == "k_shot" and trained
                       else "no training rows to learn it from") for n in e.baselines if n not in baseline_predictions}
        baselines = baseline_table({n: baseline_predictions[n] for n in order}, scored["tuned"], gold, labels, primary,
                                   cfg, notes, missing)
        calibrated = {m: calibration(label_scores[m], gold, cfg) for m in ("baseline", "tuned")}
        verdict = worth_it(baselines, scored["tuned"][primary].value)
        log.info("is fine-tuning worth it here? %s", verdict)

    rows = prediction_rows(records, prompts, refs, answers, groups, scored, eval_ppl, labels, label_scores, baselines,
                           baseline_predictions)
    pred_path = write_outputs(Path(out_dir), rows, general, general_prompts, general_answers, right)
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    seconds["total"] = round(time.perf_counter() - started, 1)
    examples = [{k: row[k] for k in ("id", "prompt", "reference", "baseline", "tuned", "group")} for row in rows]
    return EvalResult(
        baseline=baseline,
        tuned=tuned,
        primary_metric=primary,
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
        labels=labels,
        baselines=baselines,
        calibration=calibrated,
        worth_it=verdict,
        baseline_cache=cache.summary(),
    )
