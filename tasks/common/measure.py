"""Measuring answers: task metrics with per-row statistics, label mapping, and the paired bootstrap.

Every metric value carries its per-row statistics (`Scored`), so any subset of rows (a bootstrap resample, the
rephrased rows, the champion's rows) is re-measured exactly. Shared by evaluation, augmentation (label checks) and
registration (the champion on the same rows).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache, partial
from typing import Any

import metrics as _metrics
from tasks.common.facts import key_facts
from tasks.config import ConfigError, FewtuneConfig

log = logging.getLogger("fewtune.evaluate")

# metric module -> key of its score in the results, per task type
TASK_METRICS: dict[str, dict[str, str]] = {
    "generation": {
        "exact_match": "exact_match",
        "token_f1": "token_f1",
        "rouge_l": "rouge_l",
        "bleu": "bleu",
        "fact_accuracy": "fact_accuracy",
    },
    "classification": {
        "accuracy": "accuracy",
        "precision": "macro_precision",
        "recall": "macro_recall",
        "f1": "macro_f1",
    },
}


LOWER_IS_BETTER = {"eval_ppl"}


@dataclass
class Scored:
    """A metric's value on a set of rows, each row's statistic, and how to recompute the value on any subset."""

    value: float
    items: list[Any]
    aggregate: Callable[[list[Any]], float]

    def on(self, index: Sequence[int]) -> float:
        return self.aggregate([self.items[i] for i in index])


def task_type(records: list[dict[str, Any]], cfg: FewtuneConfig) -> str:
    """`evaluate.task`, or for auto: classification when every eval row carries a label, else generation."""
    if cfg.evaluate.task != "auto":
        return cfg.evaluate.task
    return "classification" if records and all(r.get("label") not in (None, "") for r in records) else "generation"


def _reference(record: dict[str, Any]) -> str:
    messages = record.get("messages") or []
    return str(messages[-1].get("content", "")) if messages and messages[-1].get("role") == "assistant" else ""


def resolve_primary_metric(task: str, records: list[dict[str, Any]], cfg: FewtuneConfig) -> str:
    """The metric the gate compares: `evaluate.primary_metric`, or for auto: macro_f1 for a classification task;
    for generation fact_accuracy when at least `evaluate.fact_rows_share` of the references carry key facts (numbers,
    times, prices, names, ...: correctness can be checked), else rouge_l."""
    chosen = cfg.evaluate.primary_metric
    if chosen != "auto":
        return chosen
    if task == "classification":
        return "macro_f1"
    with_facts = sum(bool(key_facts(_reference(r))) for r in records)
    share = with_facts / len(records) if records else 0.0
    metric = "fact_accuracy" if records and share >= cfg.evaluate.fact_rows_share else "rouge_l"
    log.info(
        "evaluate.primary_metric auto: %s (%d of %d references carry key facts; fact_accuracy from %.0f%%)",
        metric, with_facts, len(records), 100 * cfg.evaluate.fact_rows_share,
    )
    return metric


def check_primary_metric(task: str, cfg: FewtuneConfig, metric: str | None = None) -> None:
    """Stop when the gate's metric (`metric`, as `resolve_primary_metric` resolved it; default: the configured one)
    is not a metric of this task. auto always resolves to one."""
    metric = cfg.evaluate.primary_metric if metric is None else metric
    keys = list(TASK_METRICS[task].values())
    if metric != "auto" and metric not in keys:
        why = "every eval row has a label" if task == "classification" else "the eval rows have no labels"
        raise ConfigError(
            f"evaluate.primary_metric is {metric!r}, but this is a {task} task ({why}); "
            f"use auto or one of {', '.join(keys)} (or set evaluate.task)"
        )


@lru_cache(maxsize=None)
def _loaded(module: str):
    """A metric module loaded once per process: `evaluate.load` costs ~30 ms a call, and an evaluation scores each
    metric for several answer sets (baseline, tuned, original phrasings, baselines of labelled data)."""
    return _metrics.load_metric(module)


def metric_aggregator(task: str, key: str, labels: Sequence[str] | None = None) -> Callable[[list[Any]], float]:
    """How metric `key` of `task` is recomputed from the per-row statistics of any set of rows."""
    module = {v: k for k, v in TASK_METRICS[task].items()}[key]
    metric = _loaded(module)
    if task == "classification" and module != "accuracy":
        return partial(metric.aggregate, labels=sorted(set(labels or [])), average="macro")
    return metric.aggregate


def score_answers(
    task: str, answers: list[str], references: list[str], labels: Sequence[str] | None = None
) -> dict[str, Scored]:
    """Every metric of the task on these answers, with per-row statistics for the bootstrap.

    Classification: each answer is mapped to a label first (`to_label`); macro averages run over `labels`
    (default: the labels of the references).
    """
    scored: dict[str, Scored] = {}
    if task == "classification":
        labels = sorted(set(labels if labels is not None else references))
        answers = [to_label(a, labels) for a in answers]
    for module, key in TASK_METRICS[task].items():
        metric = _loaded(module)
        options: dict[str, Any] = {"labels": labels, "average": "macro"} if task == "classification" and module != "accuracy" else {}
        out = metric.compute(predictions=answers, references=references, per_example=True, **options)
        scored[key] = Scored(out[module], out[f"{module}_per_example"], metric_aggregator(task, key, labels))
    return scored




def ppl_items(nlls: list[list[float]]) -> list[tuple[float, int]]:
    """Per-row (summed NLL, scored tokens): the statistics corpus perplexity is recomputed from."""
    return [(float(sum(x)), len(x)) for x in nlls]


def ppl_aggregate(items: list[tuple[float, int]]) -> float:
    """Corpus perplexity of rows from their (summed NLL, token count): exp of the mean NLL per token."""
    tokens = sum(n for _, n in items)
    return math.exp(sum(s for s, _ in items) / tokens) if tokens else float("nan")


@dataclass
class Interval:
    """A statistic and its bootstrap percentile interval."""

    value: float
    low: float
    high: float

    def to_dict(self, digits: int = 4) -> dict[str, float]:
        return {k: round(v, digits) for k, v in asdict(self).items()}


def bootstrap(
    statistic: Callable[[list[Any]], float],
    sizes: Sequence[int],
    samples: int,
    confidence: float,
    seed: int,
) -> Interval:
    """Percentile bootstrap: `statistic` of the full data and its interval over resamples of each group of rows.

    `statistic` gets one index array per group (rows drawn with replacement, as many as the group has): one group
    for a paired comparison of two models on the same rows, two groups for independent sets (training vs held-out).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    full = statistic([np.arange(n) for n in sizes])
    values = np.array([statistic([rng.integers(0, n, n) for n in sizes]) for _ in range(samples)], dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return Interval(full, float("nan"), float("nan"))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(float(full), float(low), float(high))


def paired_delta(baseline: Scored, tuned: Scored, cfg: FewtuneConfig, relative: bool = False) -> Interval:
    """tuned − baseline (or tuned / baseline − 1 with `relative`) on the same rows, with a paired bootstrap interval."""

    def stat(idx: list[Sequence[int]]) -> float:
        b, t = baseline.on(idx[0]), tuned.on(idx[0])
        return t / b - 1 if relative else t - b

    e = cfg.evaluate
    return bootstrap(stat, [len(baseline.items)], e.bootstrap_samples, e.confidence, e.bootstrap_seed)


def _label_key(text: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in text.casefold()).split())


def to_label(answer: str, labels: Sequence[str]) -> str:
    """Map a generated answer to one of `labels`: the label it equals or starts with, ignoring case and punctuation.

    An answer that names no label is returned as it is, and counts as wrong.
    """
    said = _label_key(answer.strip().splitlines()[0] if answer.strip() else "")
    by_key = {_label_key(label): label for label in labels}
    if said in by_key:
        return by_key[said]
    for key in sorted(by_key, key=len, reverse=True):
        if key and (said.startswith(key + " ")):
            return by_key[key]
    return answer.strip()
