"""Calibration and confusion of label-constrained predictions.

`expected_calibration_error` and `reliability_bins` read the top-label confidence of each prediction (its
probability over the label set) and bin it into equal-width intervals (lower, upper] of [0, 1]; `confusion_matrix`
and `most_confused` say which labels are taken for which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence interval (lower, upper] and the predictions that fell into it."""

    lower: float
    upper: float
    confidence: float  # mean top-label probability
    accuracy: float  # share of those predictions that were right
    count: int


def _top(row: list[float]) -> tuple[int, float]:
    best = max(range(len(row)), key=row.__getitem__)  # the first of equally likely labels, as predictions() picks
    return best, row[best]


def reliability_bins(probabilities: list[list[float]], gold: list[int], bins: int = 10) -> list[ReliabilityBin]:
    """Per equal-width confidence bin holding at least one prediction: mean confidence, accuracy and count.

    `probabilities`: per example, the probability of each label (rows sum to 1); `gold`: per example, the index of
    the right label in the same order.
    """
    if len(probabilities) != len(gold):
        raise ValueError(f"reliability_bins: {len(probabilities)} probability rows but {len(gold)} gold labels")
    if bins < 1:
        raise ValueError(f"reliability_bins: bins must be at least 1, got {bins}")
    conf_sum = [0.0] * bins
    right = [0] * bins
    count = [0] * bins
    for row, g in zip(probabilities, gold):
        best, conf = _top(row)
        # Bin i holds (i / bins, (i + 1) / bins]; the smallest i with conf <= (i + 1) / bins, exact at the edges.
        b = min(bins - 1, max(0, math.ceil(conf * bins) - 1))
        while b > 0 and conf <= b / bins:
            b -= 1
        while b < bins - 1 and conf > (b + 1) / bins:
            b += 1
        conf_sum[b] += conf
        right[b] += int(best == g)
        count[b] += 1
    return [
        ReliabilityBin(i / bins, (i + 1) / bins, conf_sum[i] / count[i], right[i] / count[i], count[i])
        for i in range(bins)
        if count[i]
    ]


def expected_calibration_error(probabilities: list[list[float]], gold: list[int], bins: int = 10) -> float:
    """Σ over bins of (bin count / n) · |accuracy − mean confidence| (top-label, equal-width bins); NaN when empty."""
    table = reliability_bins(probabilities, gold, bins)
    n = sum(b.count for b in table)
    if not n:
        return float("nan")
    return sum(b.count / n * abs(b.accuracy - b.confidence) for b in table)


def confusion_matrix(predictions: list[str], gold: list[str], labels: list[str]) -> list[list[int]]:
    """Counts of (gold, predicted) label pairs: rows are gold labels, columns predicted ones, both in `labels` order."""
    if len(predictions) != len(gold):
        raise ValueError(f"confusion_matrix: {len(predictions)} predictions but {len(gold)} gold labels")
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for p, g in zip(predictions, gold):
        for what, value in (("gold label", g), ("prediction", p)):
            if value not in index:
                raise ValueError(f"confusion_matrix: {what} {value!r} is not in the label set {labels}")
        matrix[index[g]][index[p]] += 1
    return matrix


def most_confused(matrix: list[list[int]], labels: list[str], k: int) -> list[tuple[str, str, int]]:
    """The `k` most frequent mistakes as (gold, predicted, count), most frequent first (ties in label order)."""
    cells = [
        (-count, g, p)
        for g, row in enumerate(matrix)
        for p, count in enumerate(row)
        if g != p and count > 0
    ]
    return [(labels[g], labels[p], -neg) for neg, g, p in sorted(cells)[:k]]
