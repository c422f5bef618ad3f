"""Base-model perplexity of kept rewrites against their gold rows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tasks.common.models import encode_chat
from tasks.common.nll import token_nlls
from tasks.config import FewtuneConfig


def rewrite_perplexity(
    pairs: list[tuple[dict[str, Any], dict[str, Any]]],
    model,
    tokenizer,
    cfg: FewtuneConfig,
    gold_scores: dict[str, tuple[float, int]] | None = None,
) -> dict[str, Any]:
    """Base-model perplexity of each kept rewrite's answer and of its gold row's answer (tasks/score/ scoring).

    `gold_scores` (id -> (mean NLL, answer tokens), from the score stage) saves scoring gold rows again.
    """
    gold_scores = gold_scores or {}
    todo = [rw for _, rw in pairs] + [g for g, _ in pairs if g["id"] not in gold_scores]
    encoded = [encode_chat(tokenizer, r, cfg.model.max_length) for r in todo]
    nlls = token_nlls(
        model, tokenizer, encoded, cfg.score.batch_size, "augment: perplexity of rewrites and gold",
        batch_tokens=cfg.score.batch_tokens, share_prefix=cfg.score.share_prefix,
    )
    by_id = {r["id"]: (sum(x) / len(x), len(x)) for r, x in zip(todo, nlls) if x}
    by_id.update({k: v for k, v in gold_scores.items()})
    rows = []
    for gold, rw in pairs:
        if gold["id"] in by_id and rw["id"] in by_id:
            rows.append({"id": rw["id"], "parent_id": gold["id"], "gold": by_id[gold["id"]], "rewrite": by_id[rw["id"]]})
    if not rows:
        return {"rows": 0}

    def corpus(side: str) -> float:
        tokens = sum(r[side][1] for r in rows)
        return math.exp(sum(r[side][0] * r[side][1] for r in rows) / tokens)

    gold_ppl = [math.exp(r["gold"][0]) for r in rows]
    new_ppl = [math.exp(r["rewrite"][0]) for r in rows]
    return {
        "rows": len(rows),
        "gold_mean_ppl": round(sum(gold_ppl) / len(rows), 3),
        "rewrite_mean_ppl": round(sum(new_ppl) / len(rows), 3),
        "gold_corpus_ppl": round(corpus("gold"), 3),
        "rewrite_corpus_ppl": round(corpus("rewrite"), 3),
        "rows_lower": sum(n < g for n, g in zip(new_ppl, gold_ppl)),
        "per_row": [
            {"id": r["id"], "parent_id": r["parent_id"], "gold_ppl": round(g, 3), "rewrite_ppl": round(n, 3)}
            for r, g, n in zip(rows, gold_ppl, new_ppl)
        ],
    }


def read_gold_scores(scores_path: str | Path | None) -> dict[str, tuple[float, int]]:
    """id -> (mean answer NLL, answer tokens) from a score stage's `scores.parquet` (empty when absent)."""
    if not scores_path or not Path(scores_path).exists():
        return {}
    import pandas as pd

    frame = pd.read_parquet(scores_path, columns=["id", "nll_mean", "n_tokens"])
    return {str(i): (float(m), int(n)) for i, m, n in zip(frame["id"], frame["nll_mean"], frame["n_tokens"])}
