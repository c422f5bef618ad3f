"""Token F1 (SQuAD-style): harmonic mean of word precision and recall between prediction and reference.

Loaded by path (`evaluate.load("<repo>/metrics/token_f1")` or `metrics.load_metric("token_f1")`), so no hub access
is needed. The loader reads this file's imports line by line: keep one import per line.
"""

from collections import Counter

import evaluate

from metrics import _common, _text

_DESCRIPTION = """
Token F1 as in the SQuAD evaluation script: both texts are normalized (lower-cased, punctuation removed, the English
articles a/an/the removed, whitespace collapsed, exactly as `exact_match` does), split on whitespace, and compared as
bags of words: precision = shared words / prediction words, recall = shared words / reference words,
F1 = 2PR / (P + R). Two empty texts score 1, one empty text scores 0. With several references the best one counts.
The score is the mean over all pairs.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, or of lists of acceptable reference texts (the best score counts).
    per_example: also return `token_f1_per_example`, the F1 of each pair (default False); the mean of any subset of
        them is that subset's score (`aggregate`), which is what bootstrap intervals resample.
Returns:
    token_f1: mean token F1, between 0 and 1.
Example:
    >>> metric = evaluate.load("metrics/token_f1")
    >>> metric.compute(predictions=["open from 9 to 5"], references=["we are open from 9"])
    {'token_f1': 0.6}
"""

_CITATION = _text.SQUAD_CITATION


def f1_score(prediction: str, reference: str) -> float:
    """Token F1 of one pair."""
    predicted, gold = _text.normalize(prediction).split(), _text.normalize(reference).split()
    if not predicted or not gold:
        return float(predicted == gold)
    shared = sum((Counter(predicted) & Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(gold)
    return 2 * precision * recall / (precision + recall)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TokenF1(_common.RowMeanMetric):
    KEY = "token_f1"
    DESCRIPTION = _DESCRIPTION
    KWARGS_DESCRIPTION = _KWARGS_DESCRIPTION
    CITATION = _CITATION

    def pair_scorer(self):
        return f1_score
