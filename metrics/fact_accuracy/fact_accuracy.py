"""Key-fact accuracy: the share of answers that state every key fact of their reference and contradict none.

Loaded by path (`evaluate.load("<repo>/metrics/fact_accuracy")` or `metrics.load_metric("fact_accuracy")`), so no hub
access is needed. The loader reads this file's imports line by line: keep one import per line.
"""

import math

import evaluate

from metrics import _common, _facts

_DESCRIPTION = """
Key-fact accuracy. The key facts of the reference are extracted (numbers and prices, as digits or number words;
times, where 11 am, 11:00 and 11.00am agree; phone numbers, with or without a country code; email and web addresses;
weekdays, months and other capitalised names). An answer is correct when it holds every one of them and states no
fact of a kind the reference states that the reference does not hold: another time where the reference gives times,
another number, phone number, address, weekday or month. Currency signs and units are not compared (EUR 25 and
25 euros agree). A reference without key facts says nothing this metric can check: its row is not applicable and
is left out. The score is correct rows / applicable rows, NaN when no row is applicable. With several references
per row the row is correct when it is correct for one of them.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, or of lists of acceptable reference texts (one correct reference suffices).
    per_example: also return `fact_accuracy_per_example` (default False): 1.0 (correct), 0.0 (wrong) or None (the
        reference has no key facts) per row; `aggregate` recomputes the score of any subset of them, which is what
        bootstrap intervals resample.
Returns:
    fact_accuracy: correct rows / rows whose reference carries key facts, between 0 and 1 (NaN when there are none).
Example:
    >>> metric = evaluate.load("metrics/fact_accuracy")
    >>> metric.compute(predictions=["Sunday hours are 11 am to 4 pm", "We're closed on Sundays"],
    ...                references=["On Sundays we're open 11:00-16:00", "On Sundays we're open 11:00-16:00"])
    {'fact_accuracy': 0.5}
"""


def row_score(prediction: str, references: list[str]) -> float | None:
    """1.0 when the prediction states the facts of one of the references, 0.0 when not, None when none has facts."""
    checks = [_facts.fact_check(prediction, ref) for ref in references]
    verdicts = [c["correct"] for c in checks if c["applicable"]]
    return float(any(verdicts)) if verdicts else None


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FactAccuracy(_common.LocalMetric):
    KEY = "fact_accuracy"
    DESCRIPTION = _DESCRIPTION
    KWARGS_DESCRIPTION = _KWARGS_DESCRIPTION

    def _compute(self, predictions, references, per_example=False):
        self.check_inputs(predictions)
        rows = [row_score(p, _common.candidates(refs)) for p, refs in zip(predictions, references)]
        return self.result(self.aggregate(rows), rows, per_example)

    @staticmethod
    def aggregate(items):
        """The score of a set of rows from their per-row items: the mean over applicable rows (None or NaN: not
        applicable), NaN when none is."""
        applicable = [float(x) for x in items if x is not None and not math.isnan(x)]
        return _common.mean(applicable) if applicable else float("nan")
