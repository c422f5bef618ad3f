"""What every local metric module shares: its `evaluate` info, input checks, and the result layout.

A metric script (`metrics/<name>/<name>.py`) subclasses one of these bases and sets its class attributes; the bases
live in the installed `metrics` package, which the script imports absolutely (`from metrics import _common`), so
`evaluate.load` of the script works from any working folder. Import the helper *module*, not its classes, into a
script: `evaluate` takes the first `evaluate.Metric` subclass it finds in the script as the metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import datasets
import evaluate

# A text and one reference, or a text and a list of acceptable references (the best one counts).
TEXT_FEATURES = [
    datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}),
    datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
]
# A predicted label and the gold label, as strings.
LABEL_FEATURES = datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})


def candidates(references: str | Sequence[str]) -> list[str]:
    """The acceptable references of one row: one text, or a list of them."""
    return [references] if isinstance(references, str) else list(references)


def mean(scores: Sequence[float]) -> float:
    return sum(scores) / len(scores)


class LocalMetric(evaluate.Metric):
    """An `evaluate.Metric` described by class attributes; `KEY` names its score in the result.

    With `per_example=True`, `compute` also returns `<KEY>_per_example`: one statistic per row, from which
    `aggregate` recomputes the score of any subset of rows (what bootstrap intervals resample).
    """

    KEY: ClassVar[str]
    DESCRIPTION: ClassVar[str]
    KWARGS_DESCRIPTION: ClassVar[str]
    CITATION: ClassVar[str] = ""
    FEATURES: ClassVar[Any] = TEXT_FEATURES
    REFERENCE_URLS: ClassVar[list[str]] = []
    CODEBASE_URLS: ClassVar[list[str]] = []

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.DESCRIPTION,
            citation=self.CITATION,
            inputs_description=self.KWARGS_DESCRIPTION,
            features=self.FEATURES,
            reference_urls=list(self.REFERENCE_URLS),
            codebase_urls=list(self.CODEBASE_URLS),
        )

    def check_inputs(self, predictions: Sequence[Any]) -> None:
        if not predictions:
            raise ValueError(f"{self.KEY}: no predictions to score; pass at least one prediction/reference pair")

    def result(self, value: float, rows: list[Any], per_example: bool) -> dict[str, Any]:
        """`{KEY: value}`, plus the per-row statistics when asked."""
        out: dict[str, Any] = {self.KEY: value}
        if per_example:
            out[f"{self.KEY}_per_example"] = rows
        return out


class RowMeanMetric(LocalMetric):
    """A metric whose score is the mean over rows of a per-row score; with several references the best one counts.

    Subclasses implement `pair_scorer(**options)`: the function scoring one (prediction, reference) pair under the
    options given to `compute`.
    """

    def pair_scorer(self, **options: Any) -> Callable[[str, str], float]:
        raise NotImplementedError

    def _compute(
        self, predictions: list[str], references: list[str] | list[list[str]], per_example: bool = False, **options: Any
    ) -> dict[str, Any]:
        self.check_inputs(predictions)
        score = self.pair_scorer(**options)
        scores = [max(score(p, ref) for ref in candidates(refs)) for p, refs in zip(predictions, references)]
        return self.result(self.aggregate(scores), scores, per_example)

    @staticmethod
    def aggregate(scores: list[float]) -> float:
        """The metric of a set of rows from their per-row scores: the mean."""
        return mean(scores)
