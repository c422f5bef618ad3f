"""Section `score`: base-model perplexity, outliers and Selective Token Masking."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.config.base import _Section


class TokenMaskingConfig(_Section):
    enabled: bool = Field(
        False,
        description="Selective Token Masking (STM): answer tokens the frozen base model finds very surprising carry "
        "no training loss (labels -100), which keeps the fine-tune closer to the base model and reduces forgetting. "
        "Off by default: in factual domain data the surprising tokens are often the new facts themselves (prices, "
        "hours); `fewtune score DATA` shows what a threshold would mask.",
    )
    threshold: float = Field(
        100.0,
        gt=1,
        description="Token perplexity exp(NLL) under the base model above which an answer token is masked (100: the "
        "base model gave the token under 1% probability; about a quarter of the demo's answer tokens).",
    )
    max_masked_fraction: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Guard: at most this share of one answer's tokens is masked (the most surprising first); the "
        "rest keeps its loss, so no answer is masked whole. Rows where the guard held masking back are reported.",
    )


class ScoreConfig(_Section):
    batch_size: int = Field(16, ge=1, description="Most sequences per forward pass when scoring (and in evaluate's perplexity and KL passes).")
    batch_tokens: int = Field(
        2048, ge=16, description="Most tokens per forward pass when scoring (rows × longest row): bounds memory on long rows."
    )
    share_prefix: bool = Field(
        True,
        description="Compute a leading part shared by many rows (e.g. the system prompt) once and reuse its keys and "
        "values for every row that starts with it.",
    )
    min_shared_prefix: int = Field(8, ge=1, description="Shortest shared leading part, in tokens, that is reused.")
    logits_chunk: int = Field(
        512, ge=1, description="Token positions whose full-vocabulary logits are held in memory at once when scoring."
    )
    outlier_z: float = Field(3.5, gt=0, description="Robust z-score of answer log-perplexity above which a row is an outlier.")
    outlier_action: Literal["keep", "drop", "augment"] = Field(
        "keep",
        description="What happens to outlier rows: keep (train on them, listed in the report), drop (left out of "
        "augment and train), augment (passed on with their ids in the score result, for the augment stage to rewrite).",
    )
    outliers_listed: int = Field(20, ge=0, description="Outliers listed with their text in the summary and score_report.md.")
    histogram_bins: int = Field(40, ge=1, description="Bins of the answer log-perplexity histogram.")
    token_masking: TokenMaskingConfig = Field(TokenMaskingConfig(), description="Selective Token Masking (STM).")
