"""The validate stage: row checks per file, near-duplicates, the held-out split, leakage, whole-dataset checks;
every input row kept or quarantined; outputs, report and Data Docs written before a fatal check stops the run."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from data_checks import checks as C
from data_checks.checks import Severity
from data_checks.docs import write_data_docs
from data_checks.similarity import near_copies, near_duplicates
from data_checks.suite import new_context
from tasks.common.labels import label_prompt, label_set, system_prompt_for, with_label_prompt
from tasks.common.measure import check_primary_metric, task_type
from tasks.common.records import LoadResult, split_train_eval, write_jsonl
from tasks.config import ConfigError, FewtuneConfig
from tasks.validate.quarantine import (
    LOAD_CHECK,
    LOAD_DESCRIPTION,
    RecordTable,
    ValidationRun,
    reject_entries,
    top_reasons,
    write_rows,
)
from tasks.validate.summary import ValidationFailed, ValidationResult

log = logging.getLogger("fewtune.validate")


def _near_duplicates(run: ValidationRun, table: RecordTable, loaded: LoadResult) -> RecordTable:
    """Quarantine training rows that nearly repeat an earlier kept row (suite `near-duplicates`)."""
    v = run.cfg.validate_
    frame = table.frame.copy()
    found = near_duplicates(
        frame["prompt"].tolist(), frame["answer"].tolist(),
        threshold=v.near_dup_threshold, shingle_size=v.shingle_size, num_perm=v.minhash_permutations,
    )
    originals = table.rows_at(sorted({m.other for m in found.values()}))
    frame["near_dup_of"] = pd.Series({p: C.where(originals[m.other]) for p, m in found.items()}, dtype="object")
    frame["near_dup_prompt_sim"] = pd.Series({p: m.prompt_similarity for p, m in found.items()}, dtype="float64")
    frame["near_dup_answer_sim"] = pd.Series({p: m.answer_similarity for p, m in found.items()}, dtype="float64")
    checks = C.near_duplicate_checks(v.near_dup_threshold)
    return run.check_records("near-duplicates", RecordTable(table.records, frame), "train", loaded, checks)


def _leakage(run: ValidationRun, train: RecordTable, evals: RecordTable, loaded: LoadResult) -> tuple[RecordTable, int]:
    """Training rows that repeat a kept eval row leave train (suite `leakage`); returns them and the eval rows hit."""
    v = run.cfg.validate_
    frame = train.frame.copy()
    eval_frame = evals.frame
    first_eval = eval_frame.drop_duplicates("leak_key")
    eval_where = {key: C.where(r) for key, r in zip(first_eval["leak_key"], first_eval.to_dict("records"))}
    frame["exact_leak_of"] = frame["leak_key"].map(eval_where).astype("object")
    train_keys = set(frame["leak_key"])
    leaked_eval = {pos for pos, key in enumerate(eval_frame["leak_key"]) if key in train_keys}
    if v.near_duplicates:
        found = near_copies(
            frame["prompt"].tolist(), frame["answer"].tolist(),
            eval_frame["prompt"].tolist(), eval_frame["answer"].tolist(),
            threshold=v.near_dup_threshold, shingle_size=v.shingle_size, num_perm=v.minhash_permutations,
        )
        exact = frame["exact_leak_of"]
        near = {p: m[0] for p, m in found.items() if pd.isna(exact.iat[p])}
        leaked_eval.update(m.other for matches in found.values() for m in matches)
        hit = evals.rows_at(sorted({m.other for m in near.values()}))
        frame["near_leak_of"] = pd.Series({p: C.where(hit[m.other]) for p, m in near.items()}, dtype="object")
        frame["near_leak_prompt_sim"] = pd.Series({p: m.prompt_similarity for p, m in near.items()}, dtype="float64")
        frame["near_leak_answer_sim"] = pd.Series({p: m.answer_similarity for p, m in near.items()}, dtype="float64")
    checks = C.leakage_checks(v.near_duplicates, v.near_dup_threshold)
    kept = run.check_records("leakage", RecordTable(train.records, frame), "train", loaded, checks)
    return kept, len(leaked_eval)


def _labels_and_metric(train: LoadResult, eval: LoadResult | None, cfg: FewtuneConfig) -> dict[str, Any]:
    """Labelled data: the label set, and the label list put in every labelled row's system prompt (so the base model
    is shown the task); the gate's metric checked against the task before any work starts."""
    rows = train.records + (eval.records if eval is not None else [])
    check_primary_metric(task_type(eval.records if eval is not None else train.records, cfg), cfg)
    labels = label_set(cfg, rows)
    prompt = label_prompt(labels, cfg)
    for loaded in (train, eval):
        if loaded is not None and prompt:
            loaded.records = [with_label_prompt(r, prompt, labels) for r in loaded.records]
    return {"labels": labels, "system_prompt": system_prompt_for(cfg, labels) if labels else cfg.data.system_prompt}


# Tokens a labelled row needs at least beyond its system prompt: a short message and its label.
_LABEL_ROOM_TOKENS = 16


def _check_label_prompt_fits(labelled: dict[str, Any], cfg: FewtuneConfig, tokenizer: Any) -> None:
    """Stop with one message when the system prompt holding the label list leaves no room for the rows themselves
    within model.max_length (else every row would be quarantined, each for the same reason)."""
    from tasks.common.models import encode_prompt

    labels, system = labelled["labels"], labelled["system_prompt"]
    if tokenizer is None or not labels or not system or cfg.data.label_prompt is None:
        return
    used = len(encode_prompt(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": ""}], 10**9))
    limit = cfg.model.max_length
    if used + _LABEL_ROOM_TOKENS > limit:
        suggest = -(-(used + 128) // 64) * 64
        raise ConfigError(
            f"model.max_length={limit}: the system prompt with the label list ({len(labels)} labels, "
            f"data.label_prompt) already takes {used} tokens, leaving no room for the rows' messages and labels; "
            f"raise model.max_length (e.g. to {suggest}), shorten the label names or data.label_descriptions, or "
            "set data.label_prompt: null"
        )


def validate_dataset(
    train: LoadResult, eval: LoadResult | None, cfg: FewtuneConfig, out_dir: Path, tokenizer: Any = None
) -> ValidationResult:
    """Check, split and quarantine; write the kept rows, the quarantine, the report and Data Docs under `out_dir`."""
    out_dir = Path(out_dir)
    v = cfg.validate_
    labelled = _labels_and_metric(train, eval, cfg)
    _check_label_prompt_fits(labelled, cfg, tokenizer)
    docs_dir = out_dir / "data_docs"
    if docs_dir.exists():
        shutil.rmtree(docs_dir)  # pages of an earlier attempt would mix with this one's
    run = ValidationRun(cfg, None, tokenizer)
    run.context = new_context(docs_dir)
    max_length = cfg.model.max_length if tokenizer is not None else None
    if tokenizer is None:
        run.notes.append(
            "token-length checks skipped: no base model tokenizer was given (validate.token_checks=false, or "
            "`fewtune validate` without --model)"
        )
    row_checks = C.row_checks(v.max_chars, max_length, v.pii)
    run.quarantined[LOAD_CHECK] = run.flagged[LOAD_CHECK] = len(train.rejects)
    run.descriptions[LOAD_CHECK] = (Severity.ROW_ERROR.value, LOAD_DESCRIPTION, "")
    run.quarantine["train"] = reject_entries(train, "train")
    run.lap("setup")

    # 1. Row checks, file by file.
    train_kept = run.check_records("rows-train", run.row_table(train.records, "train"), "train", train, row_checks)
    if eval is not None:
        run.quarantine["eval"] = reject_entries(eval, "eval")
        run.quarantined[LOAD_CHECK] += len(eval.rejects)
        run.flagged[LOAD_CHECK] += len(eval.rejects)
        eval_table = run.check_records("rows-eval", run.row_table(eval.records, "eval"), "eval", eval, row_checks)
    run.lap("row_checks")

    # 2. Near-duplicates among the kept training rows.
    if v.near_duplicates:
        train_kept = _near_duplicates(run, train_kept, train)
        run.lap("near_duplicates")
    else:
        run.notes.append("near-duplicate and near-leakage search off (validate.near_duplicates=false)")

    # 3. Held-out split of the clean rows, before any augmentation.
    if eval is None:
        split_train, split_eval = split_train_eval(train_kept.records, cfg.data.eval_fraction, cfg.data.split_seed)
        position = {id(r): p for p, r in enumerate(train_kept.records)}
        eval_table = train_kept.keep([position[id(r)] for r in split_eval])
        train_table = train_kept.keep([position[id(r)] for r in split_train])
    else:
        train_table = train_kept

    # 4. Leakage: training rows that repeat a kept eval row leave train.
    train_table, leaked_eval = _leakage(run, train_table, eval_table, train)
    train_rows, eval_rows = train_table.records, eval_table.records
    run.lap("split_and_leakage")

    # Accounting: every input row is either kept or quarantined.
    files: dict[str, dict[str, Any]] = {}
    inputs = {"train": train} if eval is None else {"train": train, "eval": eval}
    for role, loaded in inputs.items():
        kept_train = len(train_rows) if role == "train" else 0
        kept_eval = len(eval_rows) if (role == "eval" or eval is None) else 0
        files[role] = {
            "path": loaded.path,
            "rows_in": loaded.rows_in,
            "rows_kept": kept_train + kept_eval,
            "rows_quarantined": len(run.quarantine[role]),
            "kept_as_train": kept_train,
            "kept_as_eval": kept_eval,
        }
        f = files[role]
        if f["rows_in"] != f["rows_kept"] + f["rows_quarantined"]:
            raise RuntimeError(
                f"{loaded.path}: {f['rows_in']} rows read but {f['rows_kept']} kept + {f['rows_quarantined']} "
                "quarantined; this is a bug in the validate stage, please report it with the data file"
            )

    # 5. Whole-dataset checks: fatal conditions and advice.
    quarantine_path = out_dir / "quarantine.jsonl"
    report_path = out_dir / "validation.json"
    eval_file = files.get("eval", {})
    facts = {
        "train_rows": len(train_rows), "eval_rows": len(eval_rows), "eval_source": "split" if eval is None else "file",
        "train_path": train.path, "eval_path": eval.path if eval is not None else train.path,
        "train_rows_in": files["train"]["rows_in"], "train_rows_quarantined": files["train"]["rows_quarantined"],
        "train_rows_kept": files["train"]["rows_kept"], "eval_rows_in": eval_file.get("rows_in", 0),
        "eval_rows_quarantined": eval_file.get("rows_quarantined", 0), "eval_fraction": cfg.data.eval_fraction,
        "quarantine_path": str(quarantine_path), "leaked_eval_rows": leaked_eval,
        "leak_fraction": leaked_eval / len(eval_rows) if eval_rows else 0.0,
        "small_rows": v.small_rows, "recommended_rows": v.recommended_rows, "train_method": cfg.train.method,
        "cv_folds": cfg.cv.folds, "cv_below_rows": cfg.cv.suggest_below_rows,
    }
    run.check_table("dataset", C.dataset_frame(facts),
                    C.dataset_checks(v.min_rows, v.min_eval_rows, v.max_leak_fraction, v.recommended_rows))
    files_table = C.files_frame(files)
    files_table["top_reasons"] = [top_reasons(run.quarantine[role]) for role in files]
    files_table["quarantine_path"] = str(quarantine_path)
    run.check_table("files", files_table, C.file_checks(cfg.data.max_bad_fraction))
    train_labels, eval_labels = [r.get("label") for r in train_rows], [r.get("label") for r in eval_rows]
    if any(x is not None for x in train_labels + eval_labels):
        run.check_table("labels", C.labels_frame(train_labels, eval_labels), C.label_checks(v.min_label_ratio))
    run.lap("dataset_checks")

    # Warnings of the rows that are kept (a row of the training file may have gone to the eval split).
    eval_ids, train_ids = {id(r) for r in eval_rows}, {id(r) for r in train_rows}
    warned = [
        {**entry, "split": "eval" if key in eval_ids else "train"}
        for key, entry in run.warnings.items()
        if key in eval_ids or key in train_ids
    ]
    warned_by = Counter(w.split(":", 1)[0] for e in warned for w in e["warnings"])
    warned_by.update(run.dataset_warned)

    all_entries = [e for role in run.quarantine for e in sorted(run.quarantine[role], key=lambda e: e["line"] or 0)]
    counts: dict[str, Any] = {
        "usable": not run.problems,
        "problems": run.problems,
        "dataset_warnings": run.dataset_warnings,
        "notes": run.notes,
        "eval_source": facts["eval_source"],
        **labelled,
        "files": files,
        "splits": {"train": len(train_rows), "eval": len(eval_rows)},
        "quarantined": len(all_entries),
        "warned_rows": len(warned),
        "leakage": {"eval_rows_in_train": leaked_eval, "fraction": facts["leak_fraction"]},
        "checks": {
            name: {"severity": severity, "description": text, "suite": suite, "flagged": run.flagged[name],
                   "quarantined": run.quarantined[name], "warned": warned_by[name]}
            for name, (severity, text, suite) in run.descriptions.items()
        },
        "timings_s": run.timings,
        "great_expectations": {"success": all(s.success for s in run.suites), "suites": [s.to_dict() for s in run.suites]},
        "settings": {
            **v.model_dump(),
            "max_length": max_length,
            "max_bad_fraction": cfg.data.max_bad_fraction,
            "eval_fraction": cfg.data.eval_fraction,
            "split_seed": cfg.data.split_seed,
        },
    }

    result = ValidationResult(
        train=train_rows,
        eval=eval_rows,
        quarantined=all_entries,
        counts=counts,
        train_path=write_rows(out_dir / "train.jsonl", train_rows),
        eval_path=write_rows(out_dir / "eval.jsonl", eval_rows),
        quarantine_path=write_jsonl(quarantine_path, all_entries),
        report_path=report_path,
        warnings_path=write_jsonl(out_dir / "warnings.jsonl", warned),
    )
    run.lap("write_rows")
    result.docs_path = write_data_docs(run.context, docs_dir, counts)
    run.lap("data_docs")
    report_path.write_text(json.dumps(counts, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    log.info(
        "validated: %d train rows, %d eval rows kept; %d quarantined (%s); %d rows with warnings",
        len(train_rows), len(eval_rows), len(all_entries), quarantine_path, len(warned),
    )
    if run.problems:
        raise ValidationFailed(run.problems, report_path, quarantine_path)
    return result
