"""Custom Great Expectations expectations for text that GX has no built-in check for.

- `ExpectColumnValuesToBeCleanText`: no control characters, zero-width spaces, stray byte-order marks or
  bidirectional overrides (text that displays differently from what the model reads).
- `ExpectColumnValuesToNotBeMojibake`: no text decoded with the wrong encoding (`cafÃ©`) and no U+FFFD
  replacement characters (bytes lost in decoding); detection by `ftfy`.
- `ExpectColumnValuesToNotContainPii`: no email address, phone number or card-like number (Luhn-valid), by `kind`.

Each is a column map expectation: a pandas condition per row, so Great Expectations reports the failing rows
(`unexpected_index_list`) like any built-in one. The conditions first rule out most rows with a cheap vectorised
test (a character class, an `@`, enough digits) and run the exact Python test only on the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import pandas as pd
from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnMapExpectation
from great_expectations.expectations.metrics import ColumnMapMetricProvider, column_condition_partial

from data_checks import text as T

PiiKind = Literal["email", "phone", "card"]


def _passes(column: pd.Series, suspect: pd.Series, finder: Callable[[str], str | None]) -> pd.Series:
    """True where the row is fine: not suspect, or suspect but the exact finder finds nothing."""
    ok = pd.Series(True, index=column.index)
    if suspect.any():
        ok[suspect] = column[suspect].map(finder).isna()
    return ok


def _texts(column: pd.Series) -> pd.Series:
    column = column.fillna("")
    return column if isinstance(column.dtype, pd.StringDtype) else column.astype("str")


# Vectorised pre-filters (pandas string methods). Only simple patterns here: pandas may run them with pyarrow's
# RE2 engine, which agrees with Python's `re` on character classes and literals.
_CONTROL_CLASS = "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u202a-\u202e\u2066-\u2069\ufeff]"
_NON_ASCII_CLASS = "[^\x00-\x7f]"


def _suspect_pii(texts: pd.Series, kind: str) -> pd.Series:
    if kind == "email":
        return texts.str.contains("@", regex=False)
    digits = texts.str.count("[0-9]")
    return digits >= (T.PHONE_DIGITS[0] if kind == "phone" else 13)


class ColumnValuesCleanText(ColumnMapMetricProvider):
    condition_metric_name = "column_values.fewtune_clean_text"

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column: pd.Series, **kwargs) -> pd.Series:
        texts = _texts(column)
        return _passes(texts, texts.str.contains(_CONTROL_CLASS), T.control_character)


class ColumnValuesNotMojibake(ColumnMapMetricProvider):
    condition_metric_name = "column_values.fewtune_not_mojibake"

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column: pd.Series, **kwargs) -> pd.Series:
        texts = _texts(column)
        return _passes(texts, texts.str.contains(_NON_ASCII_CLASS), T.mojibake)


class ColumnValuesWithoutPii(ColumnMapMetricProvider):
    condition_metric_name = "column_values.fewtune_without_pii"
    condition_value_keys = ("kind",)

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column: pd.Series, kind: str, **kwargs) -> pd.Series:
        texts = _texts(column)
        return _passes(texts, _suspect_pii(texts, kind), T.PII_FINDERS[kind])


class ExpectColumnValuesToBeCleanText(ColumnMapExpectation):
    """Expect text without control characters, zero-width spaces, stray byte-order marks or bidi overrides."""

    map_metric: ClassVar[str] = "column_values.fewtune_clean_text"
    success_keys: ClassVar[tuple[str, ...]] = ("mostly",)


class ExpectColumnValuesToNotBeMojibake(ColumnMapExpectation):
    """Expect text that was decoded with the right encoding (no `cafÃ©`, no U+FFFD replacement characters)."""

    map_metric: ClassVar[str] = "column_values.fewtune_not_mojibake"
    success_keys: ClassVar[tuple[str, ...]] = ("mostly",)


class ExpectColumnValuesToNotContainPii(ColumnMapExpectation):
    """Expect text without personal data of one `kind`: email address, phone number or card-like number."""

    kind: PiiKind
    map_metric: ClassVar[str] = "column_values.fewtune_without_pii"
    success_keys: ClassVar[tuple[str, ...]] = ("kind", "mostly")
    args_keys: ClassVar[tuple[str, ...]] = ("column", "kind")
