"""Sections `data`, `model` and `validate`: where the rows come from, the base model, the data checks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.config.base import _Section


class DataConfig(_Section):
    train: str = Field(description="Training data: a .jsonl/.json/.csv/.parquet file, a `save_to_disk` folder or a hub id.")
    eval: str | None = Field(None, description="Held-out eval/test data; when absent, `eval_fraction` of train is split off.")
    probe: str | None = Field(
        None,
        description="More general-ability probe rows (any accepted format), added to the probe that ships with fewtune "
        "(general prose and questions, always measured): their answers' perplexity and KL join the forgetting "
        "check. Never trained on; replay rows that nearly repeat them stop the run.",
    )
    replay: str | None = Field(
        None,
        description="General-text rows mixed into training against forgetting (see train.replay_fraction); when "
        "absent, on-policy replay: the base model's own answers to general prompts that ship with fewtune. Rows that "
        "nearly repeat a probe row stop the run (train.replay_overlap_threshold).",
    )
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "text_label"] = Field(
        "auto", description="Row shape: auto-detected from the first row, or one of messages, prompt_completion, alpaca, text_label."
    )
    eval_fraction: float = Field(0.15, gt=0, lt=1, description="Share of train held out when no eval file is given.")
    split_seed: int = Field(0, description="Seed of the deterministic train/eval split.")
    system_prompt: str | None = Field(None, description="System message added to rows that have none.")
    labels: list[str] | None = Field(
        None,
        description="Labelled data: the label set, in the order shown to the model (None: every label of the train "
        "and eval rows, sorted). Predictions are always one of these (each label's likelihood is scored).",
    )
    label_descriptions: dict[str, str] = Field(
        {},
        description="Labelled data: optional one-line description per label, shown beside it in the label prompt.",
    )
    label_prompt: str | None = Field(
        "Classify the user's message. Answer with exactly one of these labels:",
        description="Labelled data: the line that introduces the label list added to every labelled row's system "
        "prompt (train and eval alike, so the base model shown the task is a fair baseline); appended to "
        "`system_prompt` when that is set, skipped when a row's system prompt already names every label. "
        "null: no label list.",
    )
    max_bad_fraction: float = Field(
        0.2, ge=0, le=1, description="Stop the run when more than this share of rows cannot be read or is quarantined."
    )


class ModelConfig(_Section):
    base: str = Field(
        "smollm2-135m-instruct",
        description="Base model: the alias `smollm2-135m-instruct`, a hub id, a local folder or a .gguf file.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype; auto = bfloat16 where the hardware runs it fast, else float32."
    )
    max_length: int = Field(256, ge=16, description="Tokens per example after the chat template; longer rows are cut.")


class ValidateConfig(_Section):
    min_rows: int = Field(8, ge=1, description="Fewer usable training rows than this stops the run.")
    min_eval_rows: int = Field(2, ge=1, description="Fewer usable eval rows than this stops the run.")
    max_chars: int = Field(20_000, ge=1, description="Longest accepted message content, in characters.")
    near_duplicates: bool = Field(
        True,
        description="Search near-duplicates within train and near-copies of eval rows in train (MinHash over "
        "character n-grams); off: exact duplicates and exact leakage only.",
    )
    near_dup_threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Two rows are near-duplicates when both their prompts and their answers have at least this "
        "Jaccard similarity of character n-grams (case and punctuation ignored) and the same numbers.",
    )
    shingle_size: int = Field(3, ge=1, description="Characters per n-gram in the near-duplicate search.")
    minhash_permutations: int = Field(
        128, ge=16, description="MinHash permutations per text in the near-duplicate search (more: fewer misses, slower)."
    )
    max_leak_fraction: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Stop the run when more than this share of eval rows also appears (exactly or nearly) in train: "
        "the eval set is then not held out.",
    )
    pii: bool = Field(True, description="Flag emails, phone numbers and card-like numbers (warnings; rows are kept).")
    token_checks: bool = Field(
        True,
        description="Count tokens with the base model's tokenizer: quarantine rows whose answer starts beyond "
        "model.max_length, warn about rows that get cut (exact; ~0.3 ms per row on a 2-core CPU).",
    )
    min_label_ratio: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Warn when a label has fewer training rows than this share of the most common label's "
        "(classification data).",
    )
    recommended_rows: int = Field(
        1000, ge=1, description="Advise on the risks when there are fewer training rows (~1,000 per task for full fine-tuning)."
    )
    small_rows: int = Field(100, ge=1, description="Below this many training rows the size advice is stronger.")
