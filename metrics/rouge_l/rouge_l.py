"""ROUGE-L: F-measure of the longest common subsequence of words between prediction and reference.

Computed with Google's `rouge_score` package (Porter stemming on by default) and averaged over all pairs.
Loaded by path (`evaluate.load("<repo>/metrics/rouge_l")` or `metrics.load_metric("rouge_l")`), so no hub access
is needed. The loader reads this file's imports line by line: keep one import per line.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

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
class RougeL(evaluate.Metric):
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
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(
        self, predictions: list[str], references: list[str] | list[list[str]], use_stemmer: bool = True
    ) -> dict[str, float]:
        if not predictions:
            raise ValueError("rouge_l: no predictions to score; pass at least one prediction/reference pair")
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
        total = 0.0
        for prediction, refs in zip(predictions, references):
            candidates = [refs] if isinstance(refs, str) else list(refs)
            total += max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in candidates)
        return {"rouge_l": total / len(predictions)}
