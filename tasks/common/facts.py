"""Key facts of a text and whether an answer states a reference's facts: what fewtune imports.

Numbers (prices, counts, dates' days and years, as digits or number words), times (11 am, 11:00 and 11.00am agree),
phone numbers, email and web addresses, weekdays, months and other names. Augmentation's equivalence filter checks
that a rewrite keeps the gold answer's facts (`missing_facts`, `added_figures`); evaluation's `fact_accuracy` metric
checks that an answer states the reference's facts and contradicts none (`fact_check`).

The code lives in `metrics/_facts.py`, because the metric script `metrics/fact_accuracy` runs it and metric scripts
import only `metrics` and `data_checks` (docs/architecture.md); this module is its place on the ground floor.
"""

from __future__ import annotations

from metrics._facts import (
    Facts,
    added_figures,
    contradicting_facts,
    fact_check,
    key_facts,
    missing_facts,
    same_phone,
)

__all__ = [
    "Facts",
    "added_figures",
    "contradicting_facts",
    "fact_check",
    "key_facts",
    "missing_facts",
    "same_phone",
]
