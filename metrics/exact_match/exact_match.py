"""Exact match: the share of predictions equal to their reference after SQuAD-style normalization.

Loaded by path (`evaluate.load("<repo>/metrics/exact_match")` or `metrics.load_metric("exact_match")`), so no hub
access is needed. The loader reads this file's imports line by line: keep one import per line.
"""

import evaluate

from metrics import _common, _text

_DESCRIPTION = """
Exact match between each prediction and its reference (or the best of its references), averaged over all pairs.
By default both texts are normalized as SQuAD does: lower-cased, punctuation removed, the English articles
a/an/the removed, and runs of whitespace collapsed. Each step can be turned off.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, or of lists of acceptable reference texts (the best match counts).
    ignore_case: lower-case both texts before comparing (default True).
    ignore_punctuation: remove punctuation (ASCII and Unicode) before comparing (default True).
    ignore_articles: remove the words a, an and the before comparing (default True).
    per_example: also return `exact_match_per_example`, the 0/1 score of each pair (default False); the mean of
        any subset of them is that subset's score (`aggregate`), which is what bootstrap intervals resample.
Returns:
    exact_match: share of exact matches, between 0 and 1.
Example:
    >>> metric = evaluate.load("metrics/exact_match")
    >>> metric.compute(predictions=["The Cat."], references=["cat"])
    {'exact_match': 1.0}
"""

_CITATION = _text.SQUAD_CITATION


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(_common.RowMeanMetric):
    KEY = "exact_match"
    DESCRIPTION = _DESCRIPTION
    KWARGS_DESCRIPTION = _KWARGS_DESCRIPTION
    CITATION = _CITATION

    def pair_scorer(self, ignore_case: bool = True, ignore_punctuation: bool = True, ignore_articles: bool = True):
        """1.0 for a pair whose texts are equal after SQuAD normalization with these options, else 0.0."""
        options = dict(ignore_case=ignore_case, ignore_punctuation=ignore_punctuation, ignore_articles=ignore_articles)

        def score(prediction: str, reference: str) -> float:
            return float(_text.normalize(prediction, **options) == _text.normalize(reference, **options))

        return score
