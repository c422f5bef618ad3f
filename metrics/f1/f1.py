"""F1 for classification: harmonic mean of each label's precision and recall, macro-averaged by default.

Loaded by path (`evaluate.load("<repo>/metrics/f1")` or `metrics.load_metric("f1")`), so no hub access is
needed. The loader reads this file's imports line by line: keep one import per line. The counting and averaging
live in `metrics/_classification.py`, shared with precision and recall.
"""

import evaluate

from metrics import _classification

_DESCRIPTION = _classification.description(
    "F1_c = 2 P_c R_c / (P_c + R_c) (0 when both are 0), with P_c and R_c the label's precision and recall; "
    "the macro average is macro-F1",
    "f1_score",
)

_KWARGS_DESCRIPTION = _classification.kwargs_description(
    "f1",
    "F1 averaged as asked (macro-F1 by default)",
    """>>> metric.compute(predictions=["spam", "ham", "spam"], references=["spam", "spam", "spam"], labels=["ham", "spam"])
    {'f1': 0.4}""",
)


def f1(tp: int, predicted: int, gold: int) -> float:
    """One label's F1 from its counts."""
    return _classification.harmonic_mean(_classification.ratio(tp, predicted), _classification.ratio(tp, gold))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(_classification.LabelCountMetric):
    KEY = "f1"
    DESCRIPTION = _DESCRIPTION
    KWARGS_DESCRIPTION = _KWARGS_DESCRIPTION
    label_score = staticmethod(f1)
