"""Run lists of named checks as Great Expectations suites over pandas tables, and keep the results for Data Docs.

Great Expectations runs in an ephemeral (in-memory) context with one Data Docs site written under `docs_dir`
(see `data_checks.docs`). Each table is validated through a `ValidationDefinition`, which stores its result in the
context so that Data Docs can render it. Progress bars are off and Great Expectations logs only warnings. Each
failing row is identified by the table's `position` column, read from the results' `unexpected_index_list`.

Only the columns the expectations read (plus `position`) are handed to Great Expectations: it fingerprints the
whole table it gets, and the wide text columns would cost time on large datasets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import pandas as pd
from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResult
from great_expectations.data_context.types.base import ProgressBarsConfig

from data_checks.core import POSITION, Check

RESULT_FORMAT = {"result_format": "COMPLETE", "unexpected_index_column_names": [POSITION]}
DOCS_SITE = "fewtune"
SOURCE, ASSET, BATCH = "fewtune", "table", "whole-table"  # one in-memory asset; each run passes its own table


@dataclass
class CheckOutcome:
    name: str
    severity: str
    success: bool
    flagged: list[int] = field(default_factory=list)  # table positions of the failing rows


@dataclass
class SuiteOutcome:
    name: str
    success: bool
    rows: int
    checks: dict[str, CheckOutcome]

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.name,
            "success": self.success,
            "rows": self.rows,
            "expectations": {
                name: {"severity": c.severity, "success": c.success, "unexpected": len(c.flagged)}
                for name, c in self.checks.items()
            },
        }


def new_context(docs_dir: Path | None = None) -> gx.data_context.AbstractDataContext:
    """An in-memory Great Expectations context, progress bars off, with a Data Docs site in `docs_dir` if given."""
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:  # a level set by the user wins
        gx_logger.setLevel(logging.WARNING)
    # This one sets itself to INFO and announces, per context, a temporary Data Docs folder that is never used.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(
            DOCS_SITE,
            {
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(Path(docs_dir).resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    context.data_sources.add_pandas(SOURCE).add_dataframe_asset(ASSET).add_batch_definition_whole_dataframe(BATCH)
    return context


def build_suite(name: str, checks: list[Check]) -> gx.ExpectationSuite:
    suite = gx.ExpectationSuite(name=name)
    for check in checks:
        expectation = check.expectation.copy(deep=True)  # GX expectations are pydantic v1 models
        expectation.meta = {**(expectation.meta or {}), "check": check.name, "severity": check.severity.value}
        expectation.severity = check.severity.gx
        expectation.description = f"{check.name} ({check.severity.value}): {check.description}"
        suite.add_expectation(expectation)
    return suite


def run_suite(
    context: gx.data_context.AbstractDataContext, name: str, frame: pd.DataFrame, checks: list[Check]
) -> SuiteOutcome:
    """Validate `frame` against `checks`; an empty table or an empty list of checks passes trivially."""
    if frame.empty or not checks:
        outcomes = {c.name: CheckOutcome(c.name, c.severity.value, True) for c in checks}
        return SuiteOutcome(name, True, len(frame), outcomes)
    columns = list(dict.fromkeys([POSITION, *(col for check in checks for col in check.columns)]))
    suite = context.suites.add(build_suite(name, checks))
    batch_definition = context.data_sources.get(SOURCE).get_asset(ASSET).get_batch_definition(BATCH)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{name}-validation", data=batch_definition, suite=suite)
    )
    result: ExpectationSuiteValidationResult = definition.run(
        batch_parameters={"dataframe": frame[columns]}, result_format=RESULT_FORMAT
    )

    severities = {c.name: c.severity.value for c in checks}
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
        outcomes[check_name] = CheckOutcome(check_name, severities[check_name], bool(item.success), flagged)
    return SuiteOutcome(name, bool(result.success), len(frame), outcomes)
