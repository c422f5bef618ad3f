"""ROUGE-L: F-measure of the longest common subsequence of words between prediction and reference.

Computed with Google's `rouge_score` package (Porter stemming on by default) and averaged over all pairs.
Loaded by path (`evaluate.load("<repo>/metrics/rouge_l")` or `metrics.load_metric("rouge_l")`), so no hub access
is needed. The loader reads this file's imports line by line: keep one import per line.
"""

import evaluate
from rouge_score import rouge_scorer

from metrics import _common

_DESCRIPTION = """
ROUGE-L F-measure: with LCS the longest common subsequence of words, precision = LCS / prediction length,
recall = LCS / reference length, F = 2PR / (P + R). Averaged over all prediction/reference pairs; with several
references per prediction the best one counts. Tokenization is rouge_score's: lower-cased, every character other
than a-z and 0-9 separates words, so texts without Latin letters or digits score 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, or of lists of acceptable reference texts (the best score counts).
    use_stemmer: apply Porter stemming to words longer than 3 characters (default True).
    per_example: also return `rouge_l_per_example`, the F-measure of each pair (default False); the mean of any
        subset of them is that subset's score (`aggregate`), which is what bootstrap intervals resample.
Returns:
    rouge_l: mean ROUGE-L F-measure, between 0 and 1.
Example:
    >>> metric = evaluate.load("metrics/rouge_l")
    >>> metric.compute(predictions=["the cat sat on the mat"], references=["the cat is on the mat"])
    {'rouge_l': 0.8333333333333334}
"""

_CITATION = """
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    publisher = "Association for Computational Linguistics",
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeL(_common.RowMeanMetric):
    KEY = "rouge_l"
    DESCRIPTION = _DESCRIPTION
    KWARGS_DESCRIPTION = _KWARGS_DESCRIPTION
    CITATION = _CITATION
    CODEBASE_URLS = ["https://github.com/google-research/google-research/tree/master/rouge"]

    def pair_scorer(self, use_stemmer: bool = True):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
        return lambda prediction, reference: scorer.score(reference, prediction)["rougeL"].fmeasure
