"""Robustness on rephrased prompts, and which training rows the adapter learned from.

Test rows whose answer also appears in training under a different prompt are the *rephrased* rows; their metrics are
reported separately, and the tuned model also answers the training prompt of the same answer (the *original*
phrasing), so the gap between phrasings is measured on the same facts.
"""

from __future__ import annotations

from typing import Any

from tasks.common.measure import Scored, paired_delta, score_answers
from tasks.common.records import prompt_and_response, training_split
from tasks.config import FewtuneConfig
from tasks.evaluate.deltas import delta_row, subset


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
    trained, _ = training_split(train_records, cfg.train.validation_fraction, cfg.train.seed)
    return trained


def robustness_summary(
    records: list[dict[str, Any]],
    groups: dict[str, str],
    scored: dict[str, dict[str, Scored]],
    cfg: FewtuneConfig,
    *,
    task: str,
    labels: list[str] | None,
    primary: str,
    originals: dict[str, dict[str, Any]],
    original_ids: list[str],
    original_answers: list[str],
) -> dict[str, Any]:
    """Metrics per group (seen, rephrased, novel), and the tuned model on the original phrasing vs the rephrased one."""
    robustness: dict[str, Any] = {"groups": {}, "original_vs_rephrased": None}
    for group in ("seen", "rephrased", "novel"):
        index = [i for i, r in enumerate(records) if groups.get(r["id"]) == group]
        if not index:
            continue
        robustness["groups"][group] = {
            "n": len(index),
            "metrics": {
                k: delta_row(k, subset(scored["baseline"][k], index), subset(scored["tuned"][k], index), cfg)
                for k in scored["tuned"]
            },
        }
    if original_answers:
        positions = {r["id"]: i for i, r in enumerate(records)}
        index = [positions[i] for i in original_ids]
        orig_gold = [
            str(originals[i]["label"]) if task == "classification" else prompt_and_response(originals[i])[1]
            for i in original_ids
        ]
        on_original = score_answers(task, original_answers, orig_gold, labels)[primary]
        on_rephrased = subset(scored["tuned"][primary], index)
        gap = paired_delta(on_rephrased, on_original, cfg)
        robustness["original_vs_rephrased"] = {
            "metric": primary,
            "n": len(index),
            "original": round(on_original.value, 4),
            "rephrased": round(on_rephrased.value, 4),
            "gap": gap.to_dict(),
            "note": "tuned model on the training phrasing minus on the rephrased test prompt of the same answer",
        }
    return robustness
