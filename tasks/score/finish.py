"""Finishing the score stage: STM token masks, the outlier action, and the stage's files."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.common import stm
from tasks.common.models import EncodingError
from tasks.common.records import content_hash, write_jsonl
from tasks.score.report import plot_histogram, write_markdown
from tasks.score.stage import ScoreResult

if TYPE_CHECKING:
    from tasks.config import ScoreConfig

log = logging.getLogger("fewtune.score")


def _text(record: dict[str, Any], role: str) -> str:
    turns = [m["content"] for m in record.get("messages", []) if m.get("role") == role]
    return turns[-1] if turns else ""


def finish_scores(
    result: ScoreResult, records: list[dict[str, Any]], cfg: "ScoreConfig", folder: Path
) -> dict[str, Any]:
    """Apply STM masks and the outlier action to scored `records`; write the stage's files; return its result.

    Files in `folder`: `scores.parquet` (rewritten with the masks), `train.jsonl` (the rows passed on to augment and
    train), `outliers.json` (every outlier with its text and what was done with it), `score_report.md` and
    `score_histogram.png`.
    """
    import pandas as pd

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    by_id = {r["id"]: r for r in records}
    rows = result.rows

    masking = cfg.token_masking
    labelled = {r["id"] for r in records if r.get("label") not in (None, "")}  # a label is never masked
    mask_summary = stm.mask_rows(rows, masking.threshold, masking.max_masked_fraction, enabled=masking.enabled,
                                 never=labelled)
    scores_path = folder / "scores.parquet"
    pd.DataFrame(rows).to_parquet(scores_path, index=False)

    outlier_ids = [r["id"] for r in sorted(rows, key=lambda r: -r["log_ppl_z"]) if r["outlier"]]
    action = cfg.outlier_action
    dropped = set(outlier_ids) if action == "drop" else set()
    passed = [r for r in records if r["id"] not in dropped]
    train_path = write_jsonl(folder / "train.jsonl", passed)
    if action == "drop" and not passed:
        raise EncodingError(
            f"score.outlier_action=drop would drop all {len(records)} training rows; "
            "raise score.outlier_z or set score.outlier_action=keep"
        )

    outliers = []
    for r in sorted((r for r in rows if r["outlier"]), key=lambda r: -r["log_ppl_z"]):
        record = by_id.get(r["id"], {})
        outliers.append(
            {
                "id": r["id"],
                "line": r.get("line"),
                "ppl": round(float(r["ppl"]), 3),
                "seq_ppl": round(float(r["seq_ppl"]), 3) if r.get("seq_ppl") is not None else None,
                "log_ppl_z": round(float(r["log_ppl_z"]), 2),
                "action": {"keep": "kept", "drop": "dropped", "augment": "sent to augment"}[action],
                "prompt": _text(record, "user"),
                "answer": _text(record, "assistant"),
            }
        )
    outliers_path = folder / "outliers.json"
    outliers_path.write_text(json.dumps(outliers, indent=2, ensure_ascii=False), encoding="utf-8")
    histogram_path = plot_histogram(rows, cfg, folder / "score_histogram.png")

    summary = result.summary()
    summary["outlier_ids"] = outlier_ids[: cfg.outliers_listed]
    summary["outlier_action"] = action
    summary["dropped"] = len(dropped)
    summary["sent_to_augment"] = len(outlier_ids) if action == "augment" else 0
    summary["rows_passed_on"] = len(passed)
    summary["top_outliers"] = [
        {k: o[k] for k in ("id", "ppl", "log_ppl_z", "prompt", "answer")} for o in outliers[: cfg.outliers_listed]
    ]
    summary["token_masking"] = mask_summary
    summary["note"] = _note(action, len(outlier_ids), cfg)
    report_path = write_markdown(summary, outliers, cfg, folder / "score_report.md", histogram_path)
    log.info("score: %s", summary["note"])
    if masking.enabled:
        log.info(
            "score: STM masks %d of %d answer tokens (%.1f%%; threshold token perplexity %g); %d rows capped by the guard",
            mask_summary["masked_tokens"],
            mask_summary["answer_tokens"],
            100 * mask_summary["masked_fraction"],
            masking.threshold,
            mask_summary["rows_capped"],
        )
    return {
        "scores_path": str(scores_path),
        "train_path": str(train_path),
        "train_hash": content_hash(passed),
        "token_masks_path": str(scores_path) if masking.enabled else None,
        "token_masks_hash": mask_summary.get("hash"),
        "augment_ids": outlier_ids if action == "augment" else [],
        "outliers_path": str(outliers_path),
        "report_path": str(report_path),
        "histogram_path": str(histogram_path) if histogram_path else None,
        "summary": summary,
    }


def _note(action: str, n: int, cfg: "ScoreConfig") -> str:
    if not n:
        return f"no outliers (robust z of answer log-perplexity > {cfg.outlier_z})"
    if action == "keep":
        return f"{n} outlier rows kept for training (score.outlier_action=keep); see outliers.json"
    if action == "drop":
        return f"{n} outlier rows dropped from training (score.outlier_action=drop); see outliers.json"
    return f"{n} outlier rows passed on to the augment stage for rewriting (score.outlier_action=augment)"
