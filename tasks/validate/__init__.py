"""Validate stage: run the data checks, quarantine failing rows with their reasons, and stop on unusable data.

Input: the `LoadResult` of the training file and, when given, of the eval file; optionally the base model's
tokenizer (for the token-length checks; without it they are skipped and the report says so). Output, under
`out_dir`:

- `train.jsonl`, `eval.jsonl`: the kept canonical records (the eval split is made here, before any augmentation,
  when no eval file is given: `data.eval_fraction` of the kept training rows, by a seeded hash of the row ids);
- `quarantine.jsonl`: one line per rejected row, `{"file", "line", "split", "id", "reasons", "row"}`: rows the
  loader could not read, and rows that failed a row-error check (each reason is `check_name: explanation and fix`);
- `warnings.jsonl`: one line per kept row with warnings, `{"file", "line", "split", "id", "warnings"}`;
- `validation.json`: rows in / kept / quarantined per file, counts per check, fatal problems, notes and the
  Great Expectations results;
- `data_docs/`: Great Expectations Data Docs, readable offline; `data_docs/index.html` is the summary.

The checks (see `data_checks/checks.py`) run as Great Expectations suites, in this order:

1. `rows-train`, `rows-eval`: the row checks on each file;
2. `near-duplicates`: near-copies among the kept training rows (the first copy is kept);
3. the held-out split, when no eval file is given;
4. `leakage`: training rows that repeat a kept eval row, exactly or nearly, leave train (never eval: the eval set
   stays the set the user gave);
5. `dataset`, `files`, `labels`: whole-dataset checks (row counts, leakage share, quarantined share per file,
   class balance, size advice).

Every input row ends up either kept or quarantined (checked on every run). The stage raises `ValidationFailed`
after writing its outputs when a fatal check fails.

Modules: `stage` (validate_dataset), `quarantine` (suites over record tables: quarantine and warnings), `tokens`
(token lengths as training encodes them), `summary` (ValidationResult, ValidationFailed, summary lines).
"""

from tasks.validate.quarantine import LOAD_CHECK, write_rows
from tasks.validate.stage import validate_dataset
from tasks.validate.summary import ValidationFailed, ValidationResult, check_rows, summary_line
from tasks.validate.tokens import token_columns

__all__ = [
    "LOAD_CHECK",
    "ValidationFailed",
    "ValidationResult",
    "check_rows",
    "summary_line",
    "token_columns",
    "validate_dataset",
    "write_rows",
]
