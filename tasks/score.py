"""Score every training example with the frozen base model.

For each row: the perplexity of its assistant answer (the tokens that will carry loss) under the base model, the
per-token negative log-likelihoods, and a robust z-score of the log-perplexity across the dataset. Rows far above the
rest (z > `score.outlier_z`) are flagged as outliers: often mislabelled, garbled or off-domain rows, and always the
rows a small fine-tune is most tempted to memorize.

Scoring is batched over length-sorted, right-padded sequences (left padding without position ids skews
perplexity), which is many times faster than one example at a time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tasks.models import EncodingError, encode_chat

log = logging.getLogger("fewtune.score")


def token_nlls(
    model, tokenizer, encoded: list[dict[str, list[int]]], batch_size: int, desc: str = "scoring"
) -> list[list[float]]:
    """Negative log-likelihood of every labelled token of every encoded example (same order as `encoded`).

    `encoded` items hold input_ids and labels (-100 = not scored), as made by `encode_chat`.
    """
    import torch

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]), reverse=True)
    results: list[list[float]] = [[] for _ in encoded]
    was_training = model.training
    model.eval()
    with torch.inference_mode(), tqdm(total=len(encoded), desc=desc, unit="row", leave=False) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]["input_ids"]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            labels = torch.full((len(idx), width), -100, dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(encoded[i]["input_ids"])
                ids[row, :n] = torch.tensor(encoded[i]["input_ids"])
                mask[row, :n] = 1
                labels[row, :n] = torch.tensor(encoded[i]["labels"])
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            shift_logits = logits[:, :-1]
            shift_labels = labels[:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)),
                shift_labels.reshape(-1),
                ignore_index=-100,
                reduction="none",
            ).view(shift_labels.shape)
            keep = shift_labels != -100
            for row, i in enumerate(idx):
                results[i] = nll[row][keep[row]].cpu().tolist()
            bar.update(len(idx))
    model.train(was_training)
    return results


def perplexity(nlls: list[list[float]]) -> float:
    """Corpus perplexity: exp of the mean NLL over all scored tokens."""
    total = sum(len(x) for x in nlls)
    return math.exp(sum(sum(x) for x in nlls) / total) if total else float("nan")


def robust_z(values: list[float]) -> list[float]:
    """(x - median) / (1.4826 * MAD): a z-score that a few extreme rows cannot drag along."""
    if not values:
        return []
    s = sorted(values)
    mid = len(s) // 2
    median = s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
    dev = sorted(abs(v - median) for v in values)
    mad = dev[mid] if len(dev) % 2 else (dev[mid - 1] + dev[mid]) / 2
    scale = 1.4826 * mad or 1e-9
    return [(v - median) / scale for v in values]


@dataclass
class ScoreResult:
    rows: list[dict[str, Any]]  # one per record: id, n_tokens, nll_mean, ppl, log_ppl_z, outlier, token_nll
    corpus_ppl: float
    n_outliers: int
    path: Path

    def summary(self) -> dict[str, Any]:
        ppls = sorted(r["ppl"] for r in self.rows)
        return {
            "rows": len(self.rows),
            "response_ppl": round(self.corpus_ppl, 3),
            "median_row_ppl": round(ppls[len(ppls) // 2], 3) if ppls else None,
            "outliers": self.n_outliers,
            "outlier_ids": [r["id"] for r in self.rows if r["outlier"]][:20],
        }


def score_records(
    records: list[dict[str, Any]],
    model,
    tokenizer,
    *,
    max_length: int,
    batch_size: int,
    outlier_z: float,
    out_path: Path,
) -> ScoreResult:
    """Score `records` with `model` (kept frozen) and write one Parquet row per record to `out_path`."""
    import pandas as pd

    encoded = []
    for r in records:
        try:
            encoded.append(encode_chat(tokenizer, r, max_length))
        except EncodingError as exc:
            raise EncodingError(f"{exc} (source line {r.get('line')})") from None
    nlls = token_nlls(model, tokenizer, encoded, batch_size, desc="score: base-model perplexity")
    means = [sum(x) / len(x) for x in nlls]
    zs = robust_z(means)
    rows = [
        {
            "id": r["id"],
            "line": r.get("line"),
            "n_tokens": len(x),
            "nll_mean": m,
            "ppl": math.exp(m),
            "log_ppl_z": z,
            "outlier": z > outlier_z,
            "token_nll": x,
        }
        for r, x, m, z in zip(records, nlls, means, zs)
    ]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out_path, index=False)
    result = ScoreResult(rows, perplexity(nlls), sum(r["outlier"] for r in rows), out_path)
    log.info(
        "scored %d rows: response perplexity %.2f, %d outliers (robust z > %.1f)",
        len(rows),
        result.corpus_ppl,
        result.n_outliers,
        outlier_z,
    )
    return result
