"""Shared by the classification metrics precision, recall and f1: per-label counts and the three averages.

Each metric scores one label c from its counts (true positives, rows predicted as c, rows whose reference is c) and
averages over the label set as scikit-learn does with `zero_division=0`: macro (unweighted mean over labels),
micro (the score of the pooled counts) or weighted (mean weighted by each label's number of references).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from metrics._common import LABEL_FEATURES, LocalMetric

AVERAGES = ("macro", "micro", "weighted")

# (true positives, times predicted, times in the references) -> the label's score
LabelScore = Callable[[int, int, int], float]


def ratio(num: float, den: float) -> float:
    """num / den, and 0 when den is 0 (scikit-learn's zero_division=0)."""
    return num / den if den else 0.0


def harmonic_mean(precision: float, recall: float) -> float:
    return ratio(2 * precision * recall, precision + recall)


def per_class_counts(pairs: list[list[str]], labels: list[str]) -> dict[str, tuple[int, int, int]]:
    """label -> (true positives, times predicted, times in the references) over [prediction, reference] pairs."""
    counts = {label: [0, 0, 0] for label in labels}
    for prediction, reference in pairs:
        if prediction in counts:
            counts[prediction][1] += 1
            if prediction == reference:
                counts[prediction][0] += 1
        if reference in counts:
            counts[reference][2] += 1
    return {label: (c[0], c[1], c[2]) for label, c in counts.items()}


def averaged(name: str, score: LabelScore, pairs: list[list[str]], labels: list[str], average: str = "macro") -> float:
    """`score` of the pairs, averaged over `labels` as `average` says."""
    if average not in AVERAGES:
        raise ValueError(f"{name}: average={average!r}; use one of {', '.join(AVERAGES)}")
    counts = per_class_counts(pairs, labels)
    if average == "micro":
        return score(*(sum(column) for column in zip(*counts.values()))) if counts else 0.0
    scores = {label: score(*c) for label, c in counts.items()}
    if average == "weighted":
        total = sum(c[2] for c in counts.values())
        return ratio(sum(scores[label] * counts[label][2] for label in labels), total)
    return ratio(sum(scores.values()), len(scores))


def description(per_label: str, sklearn_name: str) -> str:
    """The metric's description: how one label is scored, then how labels are averaged."""
    return (
        f"\nPer label c: {per_label}. The score averages over the labels: macro (default), micro or weighted, as "
        f"scikit-learn's {sklearn_name} with zero_division=0.\n"
    )


def kwargs_description(key: str, returns: str, example: str) -> str:
    """The arguments of `compute`, the same for every classification metric."""
    return f"""
Args:
    predictions: list of predicted labels (strings; map generated answers to labels first).
    references: list of gold labels.
    labels: the label set to average over (default: every label seen in predictions or references, as
        scikit-learn does). Predictions outside this set count as wrong and belong to no class.
    average: "macro" (unweighted mean over labels, the default), "micro" (pooled counts) or "weighted" (mean
        weighted by each label's number of references).
    per_example: also return `{key}_per_example`, the [prediction, reference] pairs (default False); `aggregate`
        turns any subset of them into that subset's score, which is what bootstrap intervals resample.
Returns:
    {key}: {returns}, between 0 and 1.
Example:
    >>> metric = evaluate.load("metrics/{key}")
    {example}
"""


class LabelCountMetric(LocalMetric):
    """A classification metric computed from per-label counts; subclasses set `KEY` and `label_score`."""

    FEATURES: ClassVar[Any] = LABEL_FEATURES
    label_score: ClassVar[LabelScore]

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        labels: list[str] | None = None,
        average: str = "macro",
        per_example: bool = False,
    ) -> dict[str, Any]:
        self.check_inputs(predictions)
        pairs = [[str(p), str(r)] for p, r in zip(predictions, references)]
        labels = sorted(set(labels) if labels is not None else {p for p, _ in pairs} | {r for _, r in pairs})
        return self.result(self.aggregate(pairs, labels=labels, average=average), pairs, per_example)

    @classmethod
    def aggregate(cls, pairs: list[list[str]], labels: list[str], average: str = "macro") -> float:
        """The metric of a set of [prediction, reference] pairs; keep `labels` fixed when resampling pairs."""
        return averaged(cls.KEY, cls.label_score, pairs, labels, average)
