"""Checks of the whole dataset after the row checks: row counts, leakage share and size advice (`dataset_frame`),
quarantined share per file (`files_frame`), class balance (`labels_frame`)."""

from __future__ import annotations

from typing import Any

import great_expectations.expectations as gxe

from data_checks.core import Check, Severity


def _size_advice(row: dict[str, Any], rec: Any) -> str:
    n, small, recommended = row["train_rows"], row["small_rows"], row["recommended_rows"]
    method = row["train_method"]
    if method == "full":
        plan = (
            "train.method=full updates every weight and will likely memorise rows this few; "
            "use train.method=auto or lora (a PEFT adapter)"
        )
    else:
        plan = f"train.method={method}: fewtune trains a parameter-efficient adapter, which suits this size"
    cv = ""
    if row.get("cv_folds", 1) <= 1 and n < row.get("cv_below_rows", 0):
        cv = (
            f"; under {row['cv_below_rows']} rows (cv.suggest_below_rows) one test split's score moves a lot with "
            "which rows land in it: cv.folds=5 trains 5 adapters and reports the mean ± spread before the final one"
        )
    if n < small:
        return (
            f"{n} training rows, under {small} (validate.small_rows): expect the model to repeat training answers "
            f"verbatim; {plan}, stops early on a validation slice, and the evaluate stage measures memorisation and "
            f"forgetting; add rows (or augment.enabled=true for paraphrases) if you can{cv}"
        )
    return (
        f"{n} training rows, under the ~{recommended:,} per task that vanilla fine-tuning needs "
        f"(validate.recommended_rows); {plan}, with early stopping on a validation slice{cv}"
    )


def dataset_checks(min_rows: int, min_eval_rows: int, max_leak_fraction: float, recommended_rows: int) -> list[Check]:
    """Checks of the whole dataset after the row checks (table: `dataset_frame`)."""

    def too_few_train(row: dict[str, Any], rec: Any) -> str:
        note = f"{row['train_rows_in']} read, {row['train_rows_quarantined']} quarantined"
        if row["eval_source"] == "split":
            note += f", {row['eval_rows']} held out for eval"
        return (
            f"{row['train_path']}: {row['train_rows']} usable training rows, fewer than validate.min_rows="
            f"{min_rows} ({note})\n  fix: add training rows or correct the quarantined ones "
            f"(see {row['quarantine_path']}), or lower validate.min_rows"
        )

    def too_few_eval(row: dict[str, Any], rec: Any) -> str:
        if row["eval_source"] == "split":
            return (
                f"{row['train_path']}: the held-out split has {row['eval_rows']} eval rows (data.eval_fraction="
                f"{row['eval_fraction']} of {row['train_rows_kept']} usable rows), fewer than "
                f"validate.min_eval_rows={min_eval_rows}\n"
                "  fix: give an eval file as data.eval, raise data.eval_fraction, or add training rows"
            )
        return (
            f"{row['eval_path']}: {row['eval_rows']} usable eval rows, fewer than validate.min_eval_rows="
            f"{min_eval_rows} ({row['eval_rows_in']} read, {row['eval_rows_quarantined']} quarantined)\n"
            f"  fix: add eval rows or correct the quarantined ones (see {row['quarantine_path']}), "
            "or lower validate.min_eval_rows"
        )

    def leaking(row: dict[str, Any], rec: Any) -> str:
        return (
            f"{row['eval_path']}: {row['leaked_eval_rows']} of {row['eval_rows']} eval rows "
            f"({row['leak_fraction']:.0%}) also appear in the training data ({row['train_path']}), exactly or nearly; "
            f"above validate.max_leak_fraction={max_leak_fraction}: the eval set is not held out\n"
            "  fix: build the eval set from rows that are not in the training file (e.g. omit data.eval to let "
            "fewtune split), or raise validate.max_leak_fraction"
        )

    return [
        Check(
            name="min_rows",
            severity=Severity.FATAL,
            description=f"at least {min_rows} usable training rows (validate.min_rows)",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="train_rows", min_value=min_rows),
            explain=too_few_train,
        ),
        Check(
            name="min_eval_rows",
            severity=Severity.FATAL,
            description=f"at least {min_eval_rows} usable eval rows (validate.min_eval_rows)",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="eval_rows", min_value=min_eval_rows),
            explain=too_few_eval,
        ),
        Check(
            name="max_leakage",
            severity=Severity.FATAL,
            description=f"at most {max_leak_fraction:.0%} of eval rows also in train (validate.max_leak_fraction)",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="leak_fraction", max_value=max_leak_fraction),
            explain=leaking,
        ),
        Check(
            name="dataset_size",
            severity=Severity.WARNING,
            description=f"at least {recommended_rows:,} training rows (validate.recommended_rows)",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="train_rows", min_value=recommended_rows),
            explain=_size_advice,
        ),
    ]


def _top_reasons(row: dict[str, Any]) -> str:
    return row.get("top_reasons") or ""


def file_checks(max_bad_fraction: float) -> list[Check]:
    """Checks per input file (table: `files_frame`)."""
    return [
        Check(
            name="max_bad_fraction",
            severity=Severity.FATAL,
            description=f"at most {max_bad_fraction:.0%} of a file's rows quarantined (data.max_bad_fraction)",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="bad_fraction", max_value=max_bad_fraction),
            explain=lambda row, rec: (
                f"{row['path']}: {row['rows_quarantined']} of {row['rows_in']} rows ({row['bad_fraction']:.0%}) are "
                f"quarantined, above data.max_bad_fraction={max_bad_fraction}; most frequent: {_top_reasons(row)}\n"
                f"  fix: correct the rows listed in {row['quarantine_path']} (each names its line and reason), "
                "or raise data.max_bad_fraction"
            ),
        )
    ]


def label_checks(min_label_ratio: float) -> list[Check]:
    """Class balance of classification data (table: `labels_frame`; only when rows carry labels)."""
    return [
        Check(
            name="label_balance",
            severity=Severity.WARNING,
            description=f"every label has at least {min_label_ratio:.0%} as many training rows as the most common "
            "(validate.min_label_ratio)",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="ratio_to_largest", min_value=min_label_ratio),
            explain=lambda row, rec: (
                f"label {row['label']!r} has {row['train_count']} training rows, {row['ratio_to_largest']:.0%} of the "
                f"most common label's {row['largest']}: the model will favour the common labels; add rows of this "
                "label (or fewer of the common ones)"
            ),
        ),
        Check(
            name="label_seen_in_train",
            severity=Severity.WARNING,
            description="every eval label also appears in the training rows",
            expectation=gxe.ExpectColumnValuesToBeBetween(column="train_count", min_value=1),
            explain=lambda row, rec: (
                f"label {row['label']!r} appears in {row['eval_count']} eval rows but in no training row: the model "
                "cannot learn it; add training rows with this label"
            ),
        ),
    ]
