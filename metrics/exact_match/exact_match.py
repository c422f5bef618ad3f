"""Exact match: the share of predictions equal to their reference after SQuAD-style normalization.

Loaded by path (`evaluate.load("<repo>/metrics/exact_match")` or `metrics.load_metric("exact_match")`), so no hub
access is needed. The loader reads this file's imports line by line: keep one import per line.
"""

import re
import string
import unicodedata

import datasets
import evaluate

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
Returns:
    exact_match: share of exact matches, between 0 and 1.
Example:
    >>> metric = evaluate.load("metrics/exact_match")
    >>> metric.compute(predictions=["The Cat."], references=["cat"])
    {'exact_match': 1.0}
"""

_CITATION = """
@inproceedings{rajpurkar-etal-2016-squad,
    title = "{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text",
    author = "Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy",
    booktitle = "Proceedings of EMNLP",
    year = "2016",
}
"""

_ARTICLES = re.compile(r"\b(?:a|an|the)\b", flags=re.IGNORECASE)


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize(
    text: str, ignore_case: bool = True, ignore_punctuation: bool = True, ignore_articles: bool = True
) -> str:
    """SQuAD-style normalization: lower-case, drop punctuation, drop articles, collapse whitespace."""
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = "".join(c for c in text if not _is_punctuation(c))
    if ignore_articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str] | list[list[str]],
        ignore_case: bool = True,
        ignore_punctuation: bool = True,
        ignore_articles: bool = True,
    ) -> dict[str, float]:
        if not predictions:
            raise ValueError("exact_match: no predictions to score; pass at least one prediction/reference pair")
        options = dict(ignore_case=ignore_case, ignore_punctuation=ignore_punctuation, ignore_articles=ignore_articles)
        matches = 0
        for prediction, refs in zip(predictions, references):
            candidates = [refs] if isinstance(refs, str) else list(refs)
            predicted = normalize(prediction, **options)
            matches += any(predicted == normalize(ref, **options) for ref in candidates)
        return {"exact_match": matches / len(predictions)}
