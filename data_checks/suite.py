"""Run a list of named checks as one Great Expectations suite over a pandas table.

Great Expectations runs in an ephemeral (in-memory) context: nothing is written to disk and no project folder is
needed. Progress bars are off and Great Expectations logs only warnings. Each failing row is identified by the
table's `position` column, read from the results' `unexpected_index_list`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import great_expectations as gx
import pandas as pd
from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResult
from great_expectations.data_context.types.base import ProgressBarsConfig

from data_checks.checks import POSITION, Check

RESULT_FORMAT = {"result_format": "COMPLETE", "unexpected_index_column_names": [POSITION]}


@dataclass
class CheckOutcome:
    name: str
    success: bool
    flagged: list[int] = field(default_factory=list)  # table positions of the failing rows


@dataclass
class SuiteOutcome:
    name: str
    success: bool
    rows: int
    checks: dict[str, CheckOutcome]

    def to_dict(self) -> dict:
        return {
            "suite": self.name,
            "success": self.success,
            "rows": self.rows,
            "expectations": {name: c.success for name, c in self.checks.items()},
        }


def new_context() -> gx.data_context.AbstractDataContext:
    """An in-memory Great Expectations context with progress bars off."""
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:  # a level set by the user wins
        gx_logger.setLevel(logging.WARNING)  # else each context logs where it would put Data Docs
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def build_suite(name: str, checks: list[Check]) -> gx.ExpectationSuite:
    suite = gx.ExpectationSuite(name=name)
    for check in checks:
        expectation = check.expectation.copy(deep=True)  # GX expectations are pydantic v1 models
        expectation.meta = {**(expectation.meta or {}), "check": check.name}
        suite.add_expectation(expectation)
    return suite


def run_suite(
    context: gx.data_context.AbstractDataContext, name: str, frame: pd.DataFrame, checks: list[Check]
) -> SuiteOutcome:
    """Validate `frame` against `checks`; an empty table or an empty list of checks passes trivially."""
    if frame.empty or not checks:
        outcomes = {c.name: CheckOutcome(c.name, True) for c in checks}
        return SuiteOutcome(name, True, len(frame), outcomes)
    suite = context.suites.add(build_suite(name, checks))
    source = context.data_sources.add_pandas(f"{name}-source")
    batch_definition = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all-rows")
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    result: ExpectationSuiteValidationResult = batch.validate(suite, result_format=RESULT_FORMAT)

    outcomes: dict[str, CheckOutcome] = {}
    for item in result.results:
        check_name = item.expectation_config.meta["check"]
        info = item.exception_info or {}
        if info.get("raised_exception"):
            raise RuntimeError(
                f"data check {check_name!r} could not run in suite {name!r}: {info.get('exception_message')}"
            )
        flagged = sorted(int(entry[POSITION]) for entry in item.result.get("unexpected_index_list") or [])
        if not item.success and not flagged:
            raise RuntimeError(f"data check {check_name!r} failed in suite {name!r} without naming the failing rows")
        outcomes[check_name] = CheckOutcome(check_name, bool(item.success), flagged)
    return SuiteOutcome(name, bool(result.success), len(frame), outcomes)
