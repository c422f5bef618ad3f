"""Labelled data: predictions that are always a label, calibration, and the fair baselines beside the fine-tune.

Every prediction is the label of highest likelihood given the prompt (`tasks.common.label_scoring`), so no answer is
ever outside the label set and every row keeps its probability per label (calibration, the served model's output).
Beside the base model shown the label list (zero-shot, the evaluation's own baseline) every labelled run measures,
on the same test rows: the base model shown k training examples per label before the query (k-shot in context), and
TF-IDF word and character n-grams + logistic regression trained on the training rows. The report opens with
"is fine-tuning worth it here?", and the gate's `beat_baselines` requires the tuned model to beat the best of them.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict
from typing import Any

from tasks.common.calibration import confusion_matrix, expected_calibration_error, most_confused, reliability_bins
from tasks.common.label_scoring import LabelScores, score_labels
from tasks.common.measure import Scored, score_answers
from tasks.common.models import encode_prompt
from tasks.common.records import user_text
from tasks.config import FewtuneConfig
from tasks.evaluate.deltas import delta_row, scores_dict

log = logging.getLogger("fewtune.evaluate")

BASELINE_NAMES = {
    "zero_shot": "base model shown the label list (zero-shot)",
    "k_shot": "base model shown {k} training example(s) per label (k-shot in context)",
    "tfidf_lr": "TF-IDF n-grams + logistic regression on the training rows",
}


def predict_labels(model, tokenizer, prompts: list[list[dict[str, str]]], labels: list[str], cfg: FewtuneConfig,
                   desc: str, max_length: int | None = None) -> LabelScores:
    """Each prompt's label scores under `model` (highest likelihood = the prediction)."""
    return score_labels(model, tokenizer, prompts, labels, max_length=max_length or cfg.model.max_length,
                        batch_size=cfg.evaluate.label_batch_size, desc=desc)


def calibration(scores: LabelScores, gold: list[str], cfg: FewtuneConfig, confused: int = 5) -> dict[str, Any]:
    """Expected calibration error, reliability bins and the confusion matrix of one model's label scores."""
    index = {label: i for i, label in enumerate(scores.labels)}
    probs = scores.probabilities()
    known = [i for i, g in enumerate(gold) if g in index]
    predictions = scores.predictions()
    matrix = confusion_matrix(predictions, gold, scores.labels)
    bins = cfg.evaluate.calibration_bins
    return {
        "ece": round(expected_calibration_error([probs[i] for i in known], [index[gold[i]] for i in known], bins), 4)
        if known else None,
        "bins": [asdict(b) for b in reliability_bins([probs[i] for i in known], [index[gold[i]] for i in known], bins)]
        if known else [],
        "labels": scores.labels,
        "confusion": matrix,
        "most_confused": [list(x) for x in most_confused(matrix, scores.labels, confused)],
    }


def k_shot_examples(trained: list[dict[str, Any]], labels: list[str], k: int, seed: int) -> list[dict[str, Any]]:
    """k training rows per label (fewer where a label has fewer), drawn with `seed`, interleaved label by label."""
    rng = random.Random(seed)
    by_label: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for r in trained:
        if str(r.get("label")) in by_label:
            by_label[str(r["label"])].append(r)
    drawn = {label: rng.sample(rows, min(k, len(rows))) for label, rows in by_label.items()}
    order: list[dict[str, Any]] = []
    for round_ in range(k):  # round by round, each in its own shuffled label order: dropping from the end is even
        this = [drawn[label][round_] for label in labels if round_ < len(drawn[label])]
        rng.shuffle(this)
        order += this
    return order


def k_shot_prompt(prompt: list[dict[str, str]], examples: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The test prompt with the examples as earlier turns of the conversation (after its system prompt)."""
    system = [m for m in prompt[:1] if m["role"] == "system"]
    turns: list[dict[str, str]] = []
    for r in examples:
        turns += [{"role": "user", "content": user_text(r)}, {"role": "assistant", "content": str(r["label"])}]
    return system + turns + prompt[len(system):]


def fit_k_shot(tokenizer, prompts: list[list[dict[str, str]]], examples: list[dict[str, Any]], labels: list[str],
               max_tokens: int) -> list[dict[str, Any]]:
    """The examples, fewest dropped (the last round's first, so labels lose examples evenly) until the longest test
    prompt, in tokens, fits `max_tokens` with the longest label."""
    longest = max(prompts, key=lambda p: len(encode_prompt(tokenizer, p, 10**9)))
    shown = list(examples)
    label_room = max(len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels) + 4
    while shown and len(encode_prompt(tokenizer, k_shot_prompt(longest, shown), 10**9)) + label_room > max_tokens:
        shown.pop()
    return shown


def tfidf_lr(trained: list[dict[str, Any]], records: list[dict[str, Any]], labels: list[str], c: float) -> list[str]:
    """TF-IDF (word 1-2-grams and character 2-5-grams within words) + logistic regression, trained on the training
    rows' user text, predicting the test rows' labels."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    texts = [user_text(r) for r in trained]
    y = [str(r["label"]) for r in trained]
    if len(set(y)) < 2:
        return [y[0] if y else labels[0]] * len(records)
    model = make_pipeline(
        make_union(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, lowercase=True),
        ),
        LogisticRegression(C=c, max_iter=2000),
    )
    model.fit(texts, y)
    return [str(p) for p in model.predict([user_text(r) for r in records])]


def baseline_table(
    predictions: dict[str, list[str]], tuned: dict[str, Scored], gold: list[str], labels: list[str], primary: str,
    cfg: FewtuneConfig, notes: dict[str, str], not_measured: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Every baseline's metrics on the test rows, the tuned model's paired delta against each, and the best one.
    `not_measured`: requested baselines that could not be run, with why (the gate then cannot pass)."""
    rows: dict[str, Any] = {}
    for name, preds in predictions.items():
        scored = score_answers("classification", preds, gold, labels)
        rows[name] = {
            "name": name,
            "description": notes.get(name, BASELINE_NAMES.get(name, name)),
            "metrics": scores_dict(scored),
            "tuned_minus": delta_row(primary, scored[primary], tuned[primary], cfg),
            "correct": [p == g for p, g in zip(preds, gold)],
        }
    best = max(rows, key=lambda n: rows[n]["metrics"][primary]) if rows else None
    return {
        "primary_metric": primary,
        "systems": rows,
        "best": best,
        "best_value": rows[best]["metrics"][primary] if best else None,
        "tuned_minus_best": rows[best]["tuned_minus"] if best else None,
        "not_measured": dict(not_measured or {}),
    }


def worth_it(table: dict[str, Any], tuned_value: float) -> str:
    """One sentence: is fine-tuning worth it here, read from the tuned model's interval against the best baseline."""
    best = table.get("best")
    if not best:
        return "no baseline was measured (evaluate.baselines is empty)"
    d = table["tuned_minus_best"]
    what = f"the best baseline, {best} ({table['best_value']:.3f})"
    if d["low"] > 0:
        return f"yes: the tuned model ({tuned_value:.3f}) beats {what}; the whole 95% interval of the gain is above 0"
    if d["high"] <= 0:
        return f"no: the tuned model ({tuned_value:.3f}) does not beat {what}; use that instead, or more data"
    return (f"not shown: the tuned model ({tuned_value:.3f}) and {what} are within each other's interval "
            f"({d['low']:+.3f} to {d['high']:+.3f}); more test rows would tell")
