"""Precision for classification: of the rows predicted as a label, the share that have that label.

Loaded by path (`evaluate.load("<repo>/metrics/precision")` or `metrics.load_metric("precision")`), so no hub access is
needed. The loader reads this file's imports line by line: keep one import per line. The counting and averaging
live in `metrics/_classification.py`, shared with recall and f1.
"""

import evaluate

from metrics import _classification

_DESCRIPTION = _classification.description(
    "precision_c = true positives / rows predicted as c (0 when c is never predicted)", "precision_score"
)

_KWARGS_DESCRIPTION = _classification.kwargs_description(
    "precision",
    "precision averaged as asked",
    """>>> metric.compute(predictions=["spam", "ham", "spam"], references=["spam", "spam", "spam"])
    {'precision': 0.5}""",
)


def precision(tp: int, predicted: int, gold: int) -> float:
    """One label's precision from its counts."""
    return _classification.ratio(tp, predicted)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Precision(_classification.LabelCountMetric):
    KEY = "precision"
    DESCRIPTION = _DESCRIPTION
    KWARGS_DESCRIPTION = _KWARGS_DESCRIPTION
    label_score = staticmethod(precision)
