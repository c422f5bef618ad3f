"""Accuracy for classification: the share of predicted labels equal to the gold label.

Loaded by path (`evaluate.load("<repo>/metrics/accuracy")` or `metrics.load_metric("accuracy")`), so no hub access
is needed. The loader reads this file's imports line by line: keep one import per line.
"""

import evaluate

from metrics import _common

_DESCRIPTION = """
Accuracy = correct predictions / all predictions, comparing labels as exact strings (map generated answers to
labels first: fewtune's evaluate stage does, see tasks/evaluate/).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted labels.
    references: list of gold labels.
    per_example: also return `accuracy_per_example`, the 0/1 correctness of each row (default False); the mean of
        any subset of them is that subset's accuracy (`aggregate`), which is what bootstrap intervals resample.
Returns:
    accuracy: share of correct predictions, between 0 and 1.
Example:
    >>> metric = evaluate.load("metrics/accuracy")
    >>> metric.compute(predictions=["spam", "ham", "spam"], references=["spam", "spam", "spam"])
    {'accuracy': 0.6666666666666666}
"""


def correct(prediction: str, reference: str) -> float:
    """1.0 when the predicted label is the gold label (compared as strings), else 0.0."""
    return float(str(prediction) == str(reference))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(_common.RowMeanMetric):
    KEY = "accuracy"
    DESCRIPTION = _DESCRIPTION
    KWARGS_DESCRIPTION = _KWARGS_DESCRIPTION
    FEATURES = _common.LABEL_FEATURES

    def pair_scorer(self):
        return correct
