"""Sections `evaluate` and `register`: the measurement and the promotion gate's thresholds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.config.base import _Section


class JudgeConfig(_Section):
    enabled: bool = Field(
        False,
        description="Ask an LLM behind an OpenAI-compatible chat-completions endpoint whether each test answer is "
        "correct given its reference (generation tasks); its 0/1 verdicts become the `judge` score, with a paired "
        "interval like every metric. The prompt is in tasks/common/judge.py.",
    )
    base_url: str | None = Field(
        None,
        description="Base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 (`/chat/completions` is "
        "appended). Needed when enabled.",
    )
    model: str | None = Field(None, description="The `model` name sent to the endpoint (None: the server's default).")
    api_key_env: str = Field(
        "FEWTUNE_JUDGE_API_KEY",
        description="Environment variable holding the API key (sent as `Authorization: Bearer`; never put keys in "
        "config files). Unset: no key is sent (local servers often need none).",
    )
    timeout_s: float = Field(60.0, gt=0, description="Seconds to wait for one verdict.")
    max_retries: int = Field(
        2, ge=0, description="Retries of a request that failed with a connection error, a timeout, 429 or 5xx."
    )
    retry_delay_s: float = Field(2.0, ge=0, description="Wait before the first retry (doubled for each next one).")
    max_tokens: int = Field(
        16, ge=1, description="Reply budget per verdict (the judge answers 1 or 0; raise it for reasoning models)."
    )
    max_rows: int | None = Field(
        None, ge=1, description="Judge only the first N test rows (None: all); the others are left out of the score."
    )

    @model_validator(mode="after")
    def _needs_url(self) -> "JudgeConfig":
        if self.enabled and not self.base_url:
            raise ValueError("evaluate.judge.enabled needs evaluate.judge.base_url, e.g. http://127.0.0.1:8000/v1")
        return self


class EvaluateConfig(_Section):
    max_new_tokens: int = Field(48, ge=1, description="Greedy generation budget per test prompt.")
    batch_size: int = Field(
        160, ge=1, description="Prompts per generation batch. A model's answers to the test prompts, the general "
        "questions and the original phrasings are decoded together (a decoding step has a fixed cost whatever its rows: "
        "160 prompts in one batch take ~0.7x the time of three batches of ~50 on a CPU with a 135M model). The batch's "
        "keys and values take prompts x (prompt + new tokens) x the model's per-token cache (23 KB for a 135M model in "
        "bf16): lower it for long prompts or a large model on a small GPU.")
    label_batch_size: int = Field(
        64, ge=1, description="Labelled data: prompts per forward pass when scoring the labels (each pass also holds "
        "at most 16384 key/value positions).")
    max_examples: int | None = Field(None, ge=1, description="Evaluate on the first N test rows only (None: all).")
    primary_metric: Literal[
        "auto",
        "fact_accuracy",
        "rouge_l",
        "exact_match",
        "token_f1",
        "bleu",
        "accuracy",
        "macro_precision",
        "macro_recall",
        "macro_f1",
    ] = Field(
        "auto",
        description="Metric the promotion gate compares between baseline and tuned model: fact_accuracy, exact_match, "
        "token_f1, rouge_l or bleu for generation; accuracy, macro_precision, macro_recall or macro_f1 for "
        "classification. auto: macro_f1 for a classification task; for generation fact_accuracy (answers that state "
        "every key fact of the reference and contradict none) when at least `fact_rows_share` of the test references "
        "carry key facts (numbers, times, prices, names, ...), else rouge_l. The chosen metric is logged and recorded "
        "as the results' `primary_metric`.",
    )
    fact_rows_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="primary_metric auto: fact_accuracy decides when at least this share of the test references "
        "carry key facts (fewer: too few rows would decide, and rouge_l is used).",
    )
    judge: JudgeConfig = Field(
        JudgeConfig(),
        description="Optional LLM judge of answers against references (off by default): a `judge` score besides the "
        "task metrics.",
    )
    task: Literal["auto", "generation", "classification"] = Field(
        "auto",
        description="auto: classification when every eval row has a `label` (answers are mapped to a label and scored "
        "with accuracy and macro precision/recall/F1), else generation (text metrics).",
    )
    baselines: list[Literal["zero_shot", "k_shot", "tfidf_lr"]] = Field(
        ["zero_shot", "k_shot", "tfidf_lr"],
        description="Labelled data: the fair baselines measured on the same test rows as the tuned model, each with a "
        "paired interval: zero_shot (the base model shown the label list), k_shot (the base model shown "
        "`k_shot_per_label` training examples per label before the query), tfidf_lr (TF-IDF word and character "
        "n-grams + logistic regression trained on the training rows). The gate's beat_baselines reads the best.",
    )
    k_shot_per_label: int = Field(
        1, ge=1, description="k_shot baseline: training examples per label shown before each test query."
    )
    k_shot_max_tokens: int = Field(
        2048,
        ge=64,
        description="k_shot baseline: longest prompt in tokens (and at most the model's context); examples are left "
        "out (evenly over labels) until the longest prompt fits, and the number shown is recorded.",
    )
    tfidf_c: float = Field(
        10.0, gt=0, description="tfidf_lr baseline: inverse regularization strength C of the logistic regression."
    )
    calibration_bins: int = Field(
        10, ge=2, description="Labelled data: equal-width confidence bins of the expected calibration error."
    )
    examples_in_summary: int = Field(5, ge=0, description="Side-by-side example outputs kept in the summary.")
    bootstrap_samples: int = Field(
        1000, ge=100, description="Paired bootstrap resamples of the test rows for every delta's interval."
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Coverage of the bootstrap percentile intervals.")
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap resampling and of the memorization row sample.")
    probe_max_new_tokens: int = Field(
        32, ge=1, description="Greedy generation budget per general-probe question (short factual answers)."
    )
    probe_max_rows: int | None = Field(
        None,
        ge=1,
        description="Measure forgetting on at most this many prose passages and this many general questions of the "
        "probe (None: all; fewer rows give wider intervals, which the gate reads as insufficient evidence).",
    )
    memorization_rows: int = Field(
        64,
        ge=0,
        description="Training rows (and as many rows of the validation slice held out of training, the control) "
        "checked for verbatim extraction; 0: off.",
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
    memorization_context: Literal["keep", "drop_system"] = Field(
        "keep",
        description="What the extraction check asks with. keep: the row's messages as trained. drop_system: for "
        "grounded data, whose system message carries the text each answer is read from (a support desk's policy "
        "entry, retrieved passages): the check runs without the system message, so an answer counts as extracted "
        "only when the model recalls it, not when it reads it from the prompt (with the text in place, trained and "
        "held-out rows are both copied and the check cannot tell them apart).",
    )
    near_verbatim_agreement: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Near-verbatim extraction: at least this share of the rest's tokens are the greedy choice.",
    )
    @model_validator(mode="after")
    def _metric_fits_task(self) -> "EvaluateConfig":
        labelled = {"accuracy", "macro_precision", "macro_recall", "macro_f1"}
        if self.task == "classification" and self.primary_metric not in labelled | {"auto"}:
            raise ValueError(f"primary_metric {self.primary_metric!r} is a generation metric but task is classification; "
                             f"use auto or one of {', '.join(sorted(labelled))}")
        if self.task == "generation" and self.primary_metric in labelled:
            raise ValueError(f"primary_metric {self.primary_metric!r} is a label metric but task is generation; use auto "
                             "or fact_accuracy, rouge_l, exact_match, token_f1, bleu")
        return self

    baseline_cache: bool = Field(
        True,
        description="Keep the base model's side of the evaluation (answers, perplexities, probe answers, k-shot, "
        "extraction) under the runs folder's .cache/baseline, keyed by the base model, the eval rows, these "
        "settings and the code: a re-train on new rows (the nightly run) reuses it instead of recomputing it.",
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
    bundle_base: bool = Field(
        False,
        description="Log the base model's weights with every registered version, so a serving machine needs nothing "
        "but the registry (costs the base model's size per version). false: the version records a portable reference "
        "(spec or hub id + weights fingerprint) and the serving machine supplies the base (docs/serving.md).",
    )
    min_gain: float = Field(
        0.0,
        description="Gate (task_gain): the (tuned - baseline) primary metric must beat this with its whole interval: "
        "the lower end above it passes, the upper end at or below it fails, an interval around it is insufficient "
        "evidence (not promoted).",
    )
    max_forgetting: float | None = Field(
        0.2,
        ge=0,
        description="Gate (forgetting_ppl): largest accepted relative rise of general-text perplexity, tuned / base - 1, "
        "at the upper end of its interval (0.2 = +20%, i.e. +0.18 nats per token on general prose). null: not checked.",
    )
    max_kl_general: float | None = Field(
        0.5,
        ge=0,
        description="Gate (forgetting_kl_general): largest accepted mean KL(base ‖ tuned) of next-token distributions "
        "on general prompts, nats per token, at the upper end of its interval (the demo's fine-tune, whose general "
        "ability held, measured 0.18 and 0.27 in two runs; docs/evaluation.md). null: not checked.",
    )
    max_kl_task: float | None = Field(
        2.0,
        ge=0,
        description="Gate (forgetting_kl_task): largest accepted mean KL(base ‖ tuned) on the task's own test prompts, "
        "nats per token, at the upper end of its interval; a large drift on new-task inputs predicts forgetting. A "
        "fine-tune must move its task answers, so this bound is loose (the demo measured 0.83 and 0.96). null: not checked.",
    )
    max_general_accuracy_drop: float | None = Field(
        0.15,
        ge=0,
        le=1,
        description="Gate (forgetting_flips): largest accepted drop of accuracy on the general questions, base minus "
        "tuned (0.15 = 15 points), at the upper end of its interval (60 questions: a fine-tune with no net change "
        "still spans about +-0.11). null: not checked.",
    )
    max_memorization: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Gate (memorization): largest accepted memorization excess, the rise in extraction on training "
        "rows beyond the rise on held-out rows of the training distribution (0.1 = 10 points), at the upper end of "
        "its interval.",
    )
    memorization_measure: Literal["near_verbatim", "exact"] = Field(
        "near_verbatim", description="Extraction rate the memorization criterion reads."
    )
    beat_baselines: bool = Field(
        True,
        description="Gate (beat_baselines, labelled data): the tuned model's primary metric must beat every one of "
        "evaluate.baselines (zero-shot, k-shot, TF-IDF + logistic regression) by more than `baseline_margin` at the "
        "lower end of its paired interval, so a fine-tune that loses to a prompt or a linear model is never "
        "promoted; a requested baseline that could not run makes it an error. false: not checked.",
    )
    baseline_margin: float = Field(
        0.0, description="Gate (beat_baselines): the margin over the best baseline, in primary-metric units."
    )
    champion_margin: float = Field(
        0.0,
        description="Gate (champion): the primary metric must beat the current champion's on the same test rows by "
        "more than this at the lower end of the paired interval.",
    )
