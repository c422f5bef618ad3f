"""Selective Token Masking (STM): leave out of the training loss the answer tokens the base model finds most surprising.

Training on tokens the base model finds very unlikely forces large weight changes and makes it forget more; masking
those tokens of the ground-truth answers (labels set to -100) keeps about as much of the base model's general
ability as training on model-generated answers (Wu et al. 2025, "Mitigating Forgetting in LLM Fine-Tuning via
Low-Perplexity Token Learning", arXiv 2501.14315).

The rule, per answer token: token perplexity exp(NLL) under the frozen base model above `threshold` → masked. The
guard: at most `max_masked_fraction` of one answer's tokens is masked (the most surprising ones first), so the
least surprising tokens of every answer always keep their loss and no answer is masked whole; rows where the guard
held masking back are counted and listed.

The score stage decides the masks (`mask_rows`, stored in `scores.parquet` with each row's token fingerprint); the
train stage applies them in its data collator (`MaskingCollator`). A mask applies only to a row whose token ids are
exactly those that were scored (same tokenizer, chat template and `model.max_length`); other rows, such as replay or
augmented rows, train unmasked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

from tasks.common.nll import ids_hash

log = logging.getLogger("fewtune.stm")


def select_masked(token_nll: list[float], threshold: float, max_masked_fraction: float) -> tuple[list[bool], bool]:
    """Which answer tokens to mask, and whether the guard held some back.

    Tokens with exp(nll) > threshold are candidates; at most floor(n * max_masked_fraction) of them (and never more
    than n - 2, so a short answer keeps a content token besides its end-of-turn token), those with the highest NLL,
    are masked.
    """
    nll = [float(x) for x in token_nll]
    limit = math.log(threshold)
    over = [j for j, x in enumerate(nll) if x > limit]
    # At least two tokens keep their loss: an answer is never left with only its end-of-turn token to learn.
    allowed = max(0, min(math.floor(len(nll) * max_masked_fraction), len(nll) - 2))
    capped = len(over) > allowed
    if capped:
        over = sorted(over, key=lambda j: nll[j], reverse=True)[:allowed]
    chosen = set(over)
    return [j in chosen for j in range(len(nll))], capped


def mask_rows(
    rows: list[dict[str, Any]], threshold: float, max_masked_fraction: float, *, enabled: bool, listed: int = 20,
    never: set[str] | frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Add `token_masked`, `n_masked`, `masked_fraction`, `stm_capped` to each scored row; return the summary.

    When masking is off, no token is masked, and the summary says which share the threshold would mask. Rows whose
    id is in `never` (labelled rows: the label is the whole answer, and often its most surprising part) are never
    masked.
    """
    total = masked = 0
    capped_ids: list[str] = []
    fractions: list[float] = []
    digest = hashlib.sha256()
    would = 0
    for row in rows:
        flags, capped = select_masked(row["token_nll"], threshold, max_masked_fraction)
        if row["id"] in never:
            flags, capped = [False] * len(flags), False
        n = len(flags)
        total += n
        if not enabled:
            would += sum(flags)
            flags, capped = [False] * n, False
        k = sum(flags)
        masked += k
        row["token_masked"] = flags
        row["n_masked"] = k
        row["masked_fraction"] = k / n if n else 0.0
        row["stm_capped"] = capped
        fractions.append(row["masked_fraction"])
        if capped:
            capped_ids.append(row["id"])
        if enabled:
            positions = [int(p) for p, f in zip(row["token_pos"], flags) if f]
            digest.update(json.dumps([row["ids_hash"], positions]).encode())
    summary: dict[str, Any] = {"enabled": enabled, "threshold": threshold, "max_masked_fraction": max_masked_fraction}
    if not enabled:
        summary["would_mask_fraction"] = round(would / total, 4) if total else 0.0
        return summary
    summary |= {
        "answer_tokens": total,
        "masked_tokens": masked,
        "masked_fraction": round(masked / total, 4) if total else 0.0,
        "rows_masked": sum(1 for f in fractions if f > 0),
        "row_fraction_mean": round(sum(fractions) / len(fractions), 4) if fractions else 0.0,
        "row_fraction_max": round(max(fractions), 4) if fractions else 0.0,
        "rows_capped": len(capped_ids),
        "rows_never_masked": sum(1 for row in rows if row["id"] in never),
        "capped_ids": capped_ids[:listed],
        "hash": digest.hexdigest()[:16],
    }
    return summary


def load_masks(scores_path: str | Path) -> dict[str, list[int]]:
    """Token fingerprint → positions (in input_ids) whose label is masked, from a score stage's `scores.parquet`."""
    import pandas as pd

    frame = pd.read_parquet(scores_path, columns=["ids_hash", "token_pos", "token_masked"])
    masks: dict[str, list[int]] = {}
    for key, pos, flags in zip(frame["ids_hash"], frame["token_pos"], frame["token_masked"]):
        chosen = [int(p) for p, f in zip(pos, flags) if f]
        if chosen:
            masks[str(key)] = chosen
    return masks


class MaskingCollator:
    """Wraps a training data collator: sets the labels of STM-masked tokens to -100, then collates as before."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], Any], masks: dict[str, list[int]]):
        self.inner = inner
        self.masks = masks

    def mask(self, feature: dict[str, Any]) -> dict[str, Any]:
        positions = self.masks.get(ids_hash(feature["input_ids"]))
        if not positions:
            return feature
        labels = list(feature["labels"])
        for p in positions:
            labels[p] = -100
        return {**feature, "labels": labels}

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        return self.inner([self.mask(f) for f in features])


def masking_collator(inner, scores_path: str | Path, rows: list[list[int]] | None = None) -> MaskingCollator:
    """`inner` with the masks of `scores_path` applied; logs how many of `rows` (encoded input_ids) get masks."""
    masks = load_masks(scores_path)
    if rows is not None:
        hit = sum(1 for ids in rows if ids_hash(ids) in masks)
        log.info(
            "STM: %d of %d training rows have masked answer tokens (%d masked tokens); rows not scored with the same "
            "encoding (e.g. replay or augmented rows) train unmasked",
            hit,
            len(rows),
            sum(len(masks[ids_hash(ids)]) for ids in rows if ids_hash(ids) in masks),
        )
    return MaskingCollator(inner, masks)
