"""Sections `evaluate` and `register`: the measurement and the promotion gate's thresholds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.config.base import _Section


class EvaluateConfig(_Section):
    max_new_tokens: int = Field(48, ge=1, description="Greedy generation budget per test prompt.")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    max_examples: int | None = Field(None, ge=1, description="Evaluate on the first N test rows only (None: all).")
    primary_metric: Literal[
        "rouge_l", "exact_match", "token_f1", "bleu", "accuracy", "macro_precision", "macro_recall", "macro_f1"
    ] = Field(
        "rouge_l",
        description="Metric the promotion gate compares between baseline and tuned model: exact_match, token_f1, "
        "rouge_l or bleu for generation; accuracy, macro_precision, macro_recall or macro_f1 for classification.",
    )
    task: Literal["auto", "generation", "classification"] = Field(
        "auto",
        description="auto: classification when every eval row has a `label` (answers are mapped to a label and scored "
        "with accuracy and macro precision/recall/F1), else generation (text metrics).",
    )
    examples_in_summary: int = Field(5, ge=0, description="Side-by-side example outputs kept in the summary.")
    bootstrap_samples: int = Field(
        1000, ge=100, description="Paired bootstrap resamples of the test rows for every delta's interval."
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Coverage of the bootstrap percentile intervals.")
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap resampling and of the memorization row sample.")
    probe_generate: bool = Field(
        True, description="Also answer the probe prompts and score them (`probe_metric`), besides probe perplexity."
    )
    probe_metric: Literal["exact_match", "token_f1", "rouge_l", "bleu"] = Field(
        "token_f1", description="Task metric of the probe answers (the forgetting check's metric)."
    )
    memorization_rows: int = Field(
        64,
        ge=0,
        description="Training rows (and as many held-out test rows, the control) checked for verbatim extraction; 0: off.",
    )
    memorization_prefix_fraction: float = Field(
        0.5, gt=0, lt=1, description="Share of the gold answer's tokens given after the prompt in the extraction check."
    )
    memorization_max_suffix_tokens: int = Field(
        32, ge=1, description="At most this many answer tokens after the given part must be reproduced."
    )
    memorization_min_suffix_tokens: int = Field(
        4, ge=1, description="Rows with fewer answer tokens left to reproduce are not checked (too short to tell)."
    )
    near_verbatim_agreement: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Near-verbatim extraction: at least this share of the rest's tokens are the greedy choice.",
    )
    robustness_original: bool = Field(
        True,
        description="Also answer the training phrasing of each rephrased test row's answer with the tuned model "
        "(the gap between original and rephrased prompts).",
    )


class RegisterConfig(_Section):
    enabled: bool = Field(True, description="Log the run to MLflow and register a model version.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: SQLite under FEWTUNE_HOME.")
    model_name: str = Field("fewtune-demo", description="Registered model name.")
    min_gain: float = Field(
        0.0,
        description="Gate: the lower end of the interval of (tuned - baseline) primary metric must exceed this.",
    )
    max_forgetting: float = Field(
        0.2,
        ge=0,
        description="Gate: largest accepted relative rise of probe perplexity, tuned / base - 1 (0.2 = +20%, i.e. "
        "+0.18 nats per token on general text).",
    )
    max_memorization: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Gate: largest accepted memorization excess, the rise in near-verbatim extraction on training "
        "rows beyond the rise on held-out rows (0.1 = 10 points).",
    )
    memorization_measure: Literal["near_verbatim", "exact"] = Field(
        "near_verbatim", description="Extraction rate the memorization criterion reads."
    )
    champion_margin: float = Field(
        0.0,
        description="Gate: the primary metric must beat the current champion's on the same test rows by more than this.",
    )
