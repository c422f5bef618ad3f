"""Score every training example with the frozen base model.

For each row, under the base model and with the chat template applied exactly as training encodes it
(`tasks.common.models.encode_chat`):

- the negative log-likelihood (NLL) of every token, from which come the perplexity of the assistant answer (the tokens
  that carry loss in training) and of the full sequence (system and user turns included);
- a robust z-score of the answer's log-perplexity across the dataset; rows far above the rest (z > `score.outlier_z`)
  are outliers: often mislabelled, garbled or off-domain rows, and always the rows a small fine-tune is most tempted
  to memorize. `score.outlier_action` keeps them, drops them, or hands them to the augment stage;
- Selective Token Masking (STM, `score.token_masking`): answer tokens whose token perplexity exp(NLL) exceeds a
  threshold are excluded from the training loss (see `tasks/common/stm.py`).

How scoring is made fast (`benchmarks/bench_score.py` measures it against a per-example loop and an `evaluate`-style
batch): rows are grouped by a shared leading part (typically the system prompt), whose keys and values are computed
once per group and reused by every row of the group; inside a group rows are sorted by length and cut into batches
by row and token budgets, right-padded (left padding without position ids skews perplexity); the last token of each
row is not fed (nothing follows it); and log-probabilities are computed from the final hidden states in chunks of
positions, so the full-vocabulary logits of a batch never sit in memory at once. All under `torch.inference_mode`,
in the dtype `model.dtype` picks (fp32 on CPUs without native bf16; bf16 on GPUs).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from tasks.common.models import EncodingError, encode_chat

if TYPE_CHECKING:
    from tasks.config import ScoreConfig

log = logging.getLogger("fewtune.score")

from tasks.common.nll import ids_hash, perplexity, response_positions, robust_z, sequence_nlls, token_nlls


# ----------------------------------------------------------------------------------------------------------------
# Scoring records


@dataclass
class ScoreResult:
    rows: list[dict[str, Any]]  # one per record: id, line, n_tokens, nll_mean, ppl, seq_*, log_ppl_z, outlier, token_*
    corpus_ppl: float
    n_outliers: int
    path: Path
    seconds: float | None = None

    def summary(self) -> dict[str, Any]:
        ppls = sorted(r["ppl"] for r in self.rows)
        seq_tokens = sum(int(r.get("seq_tokens") or 0) for r in self.rows)
        seq_nll = sum(float(r["seq_nll_mean"]) * int(r["seq_tokens"]) for r in self.rows if r.get("seq_tokens"))
        out = {
            "rows": len(self.rows),
            "response_ppl": round(self.corpus_ppl, 3),
            "median_row_ppl": round(ppls[len(ppls) // 2], 3) if ppls else None,
            "sequence_ppl": round(math.exp(seq_nll / seq_tokens), 3) if seq_tokens else None,
            "outliers": self.n_outliers,
            "outlier_ids": [r["id"] for r in self.rows if r["outlier"]][:20],
        }
        if self.seconds:
            out["seconds"] = round(self.seconds, 1)
            out["tokens_per_s"] = round((seq_tokens + len(self.rows)) / self.seconds, 1)
        return out


def score_records(
    records: list[dict[str, Any]],
    model,
    tokenizer,
    *,
    max_length: int,
    batch_size: int,
    outlier_z: float,
    out_path: Path,
    batch_tokens: int | None = None,
    share_prefix: bool = True,
    min_shared_prefix: int = 8,
    logits_chunk: int = 512,
) -> ScoreResult:
    """Score `records` with `model` (kept frozen) and write one Parquet row per record to `out_path`.

    Per row: answer tokens (`n_tokens`, `nll_mean`, `ppl`), full sequence (`seq_tokens`, `seq_nll_mean`, `seq_ppl`),
    the robust z-score of the answer's log-perplexity and the outlier flag, and per answer token its NLL
    (`token_nll`) and its position in the encoded row (`token_pos`), with the row's token fingerprint (`ids_hash`).
    """
    import pandas as pd

    encoded = []
    for r in records:
        try:
            encoded.append(encode_chat(tokenizer, r, max_length))
        except EncodingError as exc:
            raise EncodingError(f"{exc} (source line {r.get('line')})") from None
    start = time.perf_counter()
    seq = sequence_nlls(
        model,
        [e["input_ids"] for e in encoded],
        pad_id=tokenizer.pad_token_id,
        batch_size=batch_size,
        batch_tokens=batch_tokens,
        share_prefix=share_prefix,
        min_shared_prefix=min_shared_prefix,
        logits_chunk=logits_chunk,
        desc="score: base-model perplexity",
    )
    seconds = time.perf_counter() - start
    rows = []
    for r, e, nll in zip(records, encoded, seq):
        pos = response_positions(e["labels"])
        if not pos:
            raise EncodingError(
                f"row {r.get('id')!r} (source line {r.get('line')}): its only answer token is the first token of the "
                "sequence, which has no context to score; check the chat template"
            )
        tok = [nll[j - 1] for j in pos]
        mean = sum(tok) / len(tok)
        seq_mean = sum(nll) / len(nll)
        rows.append(
            {
                "id": r["id"],
                "line": r.get("line"),
                "n_tokens": len(tok),
                "nll_mean": mean,
                "ppl": math.exp(mean),
                "seq_tokens": len(nll),
                "seq_nll_mean": seq_mean,
                "seq_ppl": math.exp(seq_mean),
                "token_nll": tok,
                "token_pos": pos,
                "ids_hash": ids_hash(e["input_ids"]),
            }
        )
    for row, z in zip(rows, robust_z([row["nll_mean"] for row in rows])):
        row["log_ppl_z"] = z
        row["outlier"] = z > outlier_z
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out_path, index=False)
    result = ScoreResult(
        rows, perplexity([row["token_nll"] for row in rows]), sum(row["outlier"] for row in rows), out_path, seconds
    )
    log.info(
        "scored %d rows in %.1f s: answer perplexity %.2f, %d outliers (robust z > %.1f)",
        len(rows),
        seconds,
        result.corpus_ppl,
        result.n_outliers,
        outlier_z,
    )
    return result


def scoring_options(cfg: "ScoreConfig") -> dict[str, Any]:
    """The keyword arguments of `score_records` that come from the `score` config section."""
    return {
        "batch_size": cfg.batch_size,
        "batch_tokens": cfg.batch_tokens,
        "share_prefix": cfg.share_prefix,
        "min_shared_prefix": cfg.min_shared_prefix,
        "logits_chunk": cfg.logits_chunk,
        "outlier_z": cfg.outlier_z,
    }


# ----------------------------------------------------------------------------------------------------------------
# Finishing the stage: token masks, outlier action, report files


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

    from tasks.common import stm
    from tasks.common.records import content_hash, write_jsonl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    by_id = {r["id"]: r for r in records}
    rows = result.rows

    masking = cfg.token_masking
    mask_summary = stm.mask_rows(rows, masking.threshold, masking.max_masked_fraction, enabled=masking.enabled)
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


def plot_histogram(rows: list[dict[str, Any]], cfg: "ScoreConfig", path: Path) -> Path | None:
    """Histogram of the rows' answer log-perplexity, outliers in their own colour, the outlier cut-off marked."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    values = [float(r["nll_mean"]) for r in rows]
    inliers = [v for v, r in zip(values, rows) if not r["outlier"]]
    outliers = [v for v, r in zip(values, rows) if r["outlier"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = max(1, min(cfg.histogram_bins, len(values)))
    edges = [min(values) + (max(values) - min(values)) * i / bins for i in range(bins + 1)] if max(values) > min(values) else bins
    ax.hist(inliers, bins=edges, color="#4c72b0", label=f"rows ({len(inliers)})")
    if outliers:
        ax.hist(outliers, bins=edges, color="#c44e52", label=f"outliers ({len(outliers)})")
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values)
    if mad > 0:
        ax.axvline(median + cfg.outlier_z * 1.4826 * mad, color="#c44e52", linestyle="--", linewidth=1,
                   label=f"robust z = {cfg.outlier_z:g}")
    ax.set_xlabel("answer log-perplexity under the base model (mean NLL per token, nats)")
    ax.set_ylabel("rows")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cell(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_markdown(
    summary: dict[str, Any], outliers: list[dict[str, Any]], cfg: "ScoreConfig", path: Path, histogram: Path | None
) -> Path:
    m = summary["token_masking"]
    lines = [
        "# Scores under the base model",
        "",
        f"- rows: {summary['rows']}; answer perplexity {summary['response_ppl']} (median row {summary['median_row_ppl']}), "
        f"full-sequence perplexity {summary['sequence_ppl']}",
        f"- outliers (robust z of answer log-perplexity > {cfg.outlier_z:g}): {summary['outliers']} — {summary['note']}",
    ]
    if m["enabled"]:
        lines.append(
            f"- token masking (STM): {m['masked_tokens']} of {m['answer_tokens']} answer tokens masked "
            f"({100 * m['masked_fraction']:.1f}%), token perplexity > {m['threshold']:g}; per row mean "
            f"{100 * m['row_fraction_mean']:.1f}%, max {100 * m['row_fraction_max']:.1f}%; "
            f"{m['rows_capped']} rows capped at {100 * m['max_masked_fraction']:.0f}% by the guard"
        )
    else:
        lines.append("- token masking (STM): off (score.token_masking.enabled=false)")
    if histogram:
        lines += ["", f"![answer log-perplexity histogram]({histogram.name})"]
    if outliers:
        lines += ["", "| id | line | answer ppl | z | action | prompt | answer |", "|---|---|---|---|---|---|---|"]
        for o in outliers[: cfg.outliers_listed]:
            lines.append(
                f"| {_cell(o['id'], 40)} | {o['line'] if o['line'] is not None else ''} | {o['ppl']:.1f} | "
                f"{o['log_ppl_z']:.1f} | {o['action']} | {_cell(o['prompt'])} | {_cell(o['answer'])} |"
            )
        if len(outliers) > cfg.outliers_listed:
            lines.append(f"\n{len(outliers) - cfg.outliers_listed} more in outliers.json.")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


__all__ = [
    "PrefixGroup",
    "ScoreResult",
    "finish_scores",
    "ids_hash",
    "perplexity",
    "plan_batches",
    "response_positions",
    "robust_z",
    "score_records",
    "sequence_nlls",
    "token_nlls",
]
