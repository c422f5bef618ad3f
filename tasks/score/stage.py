"""Score records with the frozen base model: per-row answer and full-sequence perplexity, the robust z-score of the
answer's log-perplexity and the outlier flag, and per answer token its NLL (what STM masks are made from).

The engine (shared-prefix reuse, length-sorted batches, chunked log-probabilities) is `tasks.common.nll`; the
package docstring of `tasks.score` says how it is made fast.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.common.models import EncodingError, encode_chats
from tasks.common.nll import (
    ids_hash,
    perplexity,
    response_positions,
    robust_z,
    sequence_nlls,
)

if TYPE_CHECKING:
    from tasks.config import ScoreConfig

log = logging.getLogger("fewtune.score")


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

    try:
        encoded = encode_chats(tokenizer, records, max_length)
    except EncodingError as exc:
        where = exc.row_index
        line = records[where].get("line") if where is not None else None
        raise EncodingError(f"{exc} (source line {line})" if line is not None else str(exc)) from None
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
