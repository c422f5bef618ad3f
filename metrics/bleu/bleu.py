"""BLEU: corpus-level n-gram precision with a brevity penalty (Papineni et al., 2002).

Loaded by path (`evaluate.load("<repo>/metrics/bleu")` or `metrics.load_metric("bleu")`), so no hub access is
needed. The loader reads this file's imports line by line: keep one import per line.
"""

import math
import re
from collections import Counter

import evaluate

from metrics import _common

_DESCRIPTION = """
Corpus BLEU as computed by the reference implementation used by `evaluate`'s hub metric (TensorFlow NMT's
compute_bleu): for n = 1..max_order, p_n = (clipped n-gram matches summed over all pairs) / (prediction n-grams
summed over all pairs); BLEU = BP * exp(mean of log p_n), and 0 when any p_n is 0. The brevity penalty is
BP = exp(1 - r/c) when the total prediction length c is below the total reference length r (with several references,
the shortest one counts for r), else 1. Texts are split into words and single punctuation marks; case is kept
unless `lowercase=True`. With `smooth=True`, p_n = (matches + 1) / (n-grams + 1) (Lin and Och, 2004).

BLEU is a corpus statistic, not a mean of sentence scores: `per_example=True` returns each pair's counts
(matches and n-grams per order, prediction and reference length), and `aggregate` turns the counts of any subset of
pairs into that subset's BLEU, which is what bootstrap intervals resample.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, or of lists of acceptable reference texts.
    max_order: longest n-gram (default 4).
    smooth: add-one smoothing of the n-gram precisions (default False).
    lowercase: lower-case both texts first (default False).
    per_example: also return `bleu_per_example`, each pair's counts
        [matches_1..max_order, ngrams_1..max_order, prediction_length, reference_length] (default False).
Returns:
    bleu: corpus BLEU, between 0 and 1.
Example:
    >>> metric = evaluate.load("metrics/bleu")
    >>> metric.compute(predictions=["the cat sat on the mat"], references=["the cat sat on the mat"])
    {'bleu': 1.0}
"""

_CITATION = """
@inproceedings{papineni-etal-2002-bleu,
    title = "{B}leu: a Method for Automatic Evaluation of Machine Translation",
    author = "Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing",
    booktitle = "Proceedings of ACL",
    year = "2002",
}
"""

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str, lowercase: bool = False) -> list[str]:
    """Words and single punctuation marks."""
    return _TOKEN.findall(text.lower() if lowercase else text)


def ngram_counts(tokens: list[str], max_order: int) -> Counter:
    counts: Counter = Counter()
    for n in range(1, max_order + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


def pair_counts(prediction: str, references: list[str], max_order: int, lowercase: bool) -> list[int]:
    """[matches per order, prediction n-grams per order, prediction length, shortest reference length]."""
    predicted = tokenize(prediction, lowercase)
    refs = [tokenize(r, lowercase) for r in references]
    best: Counter = Counter()
    for ref in refs:
        best |= ngram_counts(ref, max_order)  # clip each n-gram by its highest count in any one reference
    overlap = ngram_counts(predicted, max_order) & best
    matches = [0] * max_order
    for ngram, count in overlap.items():
        matches[len(ngram) - 1] += count
    possible = [max(0, len(predicted) - n + 1) for n in range(1, max_order + 1)]
    return matches + possible + [len(predicted), min(len(r) for r in refs)]


def bleu_from_counts(counts: list[list[int]], max_order: int = 4, smooth: bool = False) -> float:
    """Corpus BLEU of the pairs whose `pair_counts` are given."""
    totals = [sum(column) for column in zip(*counts)]
    matches, possible = totals[:max_order], totals[max_order : 2 * max_order]
    prediction_length, reference_length = totals[2 * max_order], totals[2 * max_order + 1]
    if smooth:
        precisions = [(m + 1.0) / (p + 1.0) for m, p in zip(matches, possible)]
    else:
        precisions = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible)]
    if min(precisions) <= 0:
        return 0.0
    geo_mean = math.exp(sum(math.log(p) for p in precisions) / max_order)
    if prediction_length == 0:
        return 0.0
    ratio = prediction_length / reference_length if reference_length else 1.0
    penalty = 1.0 if ratio > 1.0 else math.exp(1.0 - 1.0 / ratio)
    return geo_mean * penalty


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(_common.LocalMetric):
    KEY = "bleu"
    DESCRIPTION = _DESCRIPTION
    KWARGS_DESCRIPTION = _KWARGS_DESCRIPTION
    CITATION = _CITATION
    REFERENCE_URLS = ["https://github.com/tensorflow/nmt/blob/master/nmt/scripts/bleu.py"]

    def _compute(
        self,
        predictions: list[str],
        references: list[str] | list[list[str]],
        max_order: int = 4,
        smooth: bool = False,
        lowercase: bool = False,
        per_example: bool = False,
    ) -> dict:
        self.check_inputs(predictions)
        counts = [
            pair_counts(prediction, _common.candidates(refs), max_order, lowercase)
            for prediction, refs in zip(predictions, references)
        ]
        return self.result(self.aggregate(counts, max_order=max_order, smooth=smooth), counts, per_example)

    @staticmethod
    def aggregate(counts: list[list[int]], max_order: int = 4, smooth: bool = False) -> float:
        """Corpus BLEU of a set of pairs from their per-example counts."""
        return bleu_from_counts(counts, max_order=max_order, smooth=smooth)
