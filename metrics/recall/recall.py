"""Recall for classification: of the rows that have a label, the share predicted as that label.

Loaded by path (`evaluate.load("<repo>/metrics/recall")` or `metrics.load_metric("recall")`), so no hub access is
needed. The loader reads this file's imports line by line: keep one import per line. The counting and averaging
live in `metrics/_classification.py`, shared with precision and f1.
"""

import evaluate

from metrics import _classification

_DESCRIPTION = _classification.description(
    "recall_c = true positives / rows whose reference is c (0 when c never occurs)", "recall_score"
)

_KWARGS_DESCRIPTION = _classification.kwargs_description(
    "recall",
    "recall averaged as asked",
    """>>> metric.compute(predictions=["spam", "ham", "spam"], references=["spam", "spam", "spam"])
    {'recall': 0.3333333333333333}""",
)


def recall(tp: int, predicted: int, gold: int) -> float:
    """One label's recall from its counts."""
    return _classification.ratio(tp, gold)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Recall(_classification.LabelCountMetric):
    KEY = "recall"
    DESCRIPTION = _DESCRIPTION
    KWARGS_DESCRIPTION = _KWARGS_DESCRIPTION
    label_score = staticmethod(recall)
