"""The named data checks of the validate stage, each with a severity.

- **fatal**: the run stops with a message naming the file, the problem and the fix (too few rows, too many
  quarantined, leakage above `validate.max_leak_fraction`);
- **row error**: the row is quarantined with the check's name and explanation;
- **warning**: the row (or dataset) is kept and the finding reported.

Each check is one Great Expectations expectation over a table, plus a human explanation of a failing table row.
The tables (`data_checks/tables.py`) are built with vectorised pandas operations (helper columns such as
`max_content_chars`, `exact_leak_of`, `near_dup_of`), so expectations compare plain columns:

- `records_frame`: one row per record of one file (row checks, near-duplicates, leakage);
- `dataset_frame`: one row for the whole dataset (row counts, leakage share, size advice);
- `files_frame`: one row per input file (share quarantined);
- `labels_frame`: one row per label (class balance, eval labels unseen in training).

To add a check: add a column to the table if it needs one, then a `Check` to the matching list:
`data_checks/row_checks.py` (rows, near-duplicates, leakage) or `data_checks/dataset_checks.py` (dataset, files,
labels). `Check`, `Severity` and `where` live in `data_checks/core.py`; this module gathers them all.

Uniqueness checks (`keep_first=True`): Great Expectations flags every copy of a repeated value. The first copy in
file order that passes every other check is kept; the later copies are quarantined.
"""

from data_checks.core import POSITION, SEP, Check, Explain, Severity, duplicate_note, where
from data_checks.dataset_checks import dataset_checks, file_checks, label_checks
from data_checks.row_checks import ROLE_ORDER_HINT, ROLE_PATTERN, leakage_checks, near_duplicate_checks, row_checks
from data_checks.tables import dataset_frame, files_frame, labels_frame, records_frame, subset

__all__ = [
    "POSITION",
    "ROLE_ORDER_HINT",
    "ROLE_PATTERN",
    "SEP",
    "Check",
    "Explain",
    "Severity",
    "dataset_checks",
    "dataset_frame",
    "duplicate_note",
    "file_checks",
    "files_frame",
    "label_checks",
    "labels_frame",
    "leakage_checks",
    "near_duplicate_checks",
    "records_frame",
    "row_checks",
    "subset",
    "where",
]
