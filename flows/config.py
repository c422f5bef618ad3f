"""The one configuration model of fewtune.

Every number the pipeline uses is a named field here with a documented default. A config is read from YAML
(`configs/demo.yaml` is the embedded default) and adjusted with dotted `key=value` overrides, e.g.
`--set train.learning_rate=1e-4`. Relative paths in a config file are resolved against the file's folder, relative
paths given with `--set` against the current folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    train: str = Field(description="Training data: a .jsonl/.json/.csv/.parquet file, a `save_to_disk` folder or a hub id.")
    eval: str | None = Field(None, description="Held-out eval/test data; when absent, `eval_fraction` of train is split off.")
    probe: str | None = Field(None, description="General-ability probe set (any accepted format), for forgetting checks.")
    replay: str | None = Field(
        None,
        description="General-text rows mixed into training against forgetting (see train.replay_fraction); when "
        "absent, part of the probe set is used and kept out of the forgetting measurement.",
    )
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "text_label"] = Field(
        "auto", description="Row shape: auto-detected from the first row, or one of messages, prompt_completion, alpaca, text_label."
    )
    eval_fraction: float = Field(0.15, gt=0, lt=1, description="Share of train held out when no eval file is given.")
    split_seed: int = Field(0, description="Seed of the deterministic train/eval split.")
    system_prompt: str | None = Field(None, description="System message added to rows that have none.")
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
    batch_size: int = Field(16, ge=1, description="Most sequences per forward pass when scoring (and in evaluate's perplexity).")
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


class GeneratorConfig(_Section):
    kind: Literal["base", "local", "http"] = Field(
        "base",
        description="Which model writes rewrites and paraphrases: base (the base model itself: self-distillation "
        "proper), local (`model`: any causal LM folder, .gguf file or hub id, run in-process) or http (an "
        "OpenAI-compatible chat-completions endpoint at `url`, e.g. a larger model behind vLLM or llama.cpp).",
    )
    model: str | None = Field(
        None,
        description="kind local: the model (a folder, a .gguf file, a hub id or `smollm2-135m-instruct`); kind http: "
        "the `model` name sent to the endpoint.",
    )
    url: str | None = Field(
        None,
        description="kind http: base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 "
        "(`/chat/completions` is appended).",
    )
    api_key_env: str = Field(
        "FEWTUNE_AUGMENT_API_KEY",
        description="kind http: environment variable holding the API key (sent as `Authorization: Bearer`; never "
        "put keys in config files). Unset: no key is sent (local servers often need none).",
    )
    timeout_s: float = Field(120.0, gt=0, description="kind http: seconds to wait for one completion.")
    max_retries: int = Field(
        2, ge=0, description="kind http: retries of a request that failed with a connection error, 429 or 5xx."
    )
    retry_delay_s: float = Field(2.0, ge=0, description="kind http: wait before the first retry (doubled for each next one).")
    concurrency: int = Field(4, ge=1, description="kind http: requests in flight at once.")
    batch_size: int = Field(
        16,
        ge=1,
        description="Conversations per generation batch (local models: one left-padded `generate` call; http: "
        "requests per round). Budgets are checked between batches.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="kind base/local: CPU threads while generating (None: torch's setting, one per core). Decoding "
        "is a long series of small matrix products whose threads wait on each other; on a CPU shared with other "
        "work, 1 thread generated 4-6x faster than 2 on a 2-core machine (docs/benchmarks.md).",
    )

    @model_validator(mode="after")
    def _needs(self) -> "GeneratorConfig":
        if self.kind == "local" and not self.model:
            raise ValueError("generator kind local needs `model`: a model folder, a .gguf file or a hub id")
        if self.kind == "http" and not self.url:
            raise ValueError("generator kind http needs `url`, e.g. http://127.0.0.1:8000/v1")
        return self


class ParaphraseConfig(_Section):
    n: int | Literal["auto"] = Field(
        "auto",
        description="Paraphrases generated per training prompt (its last user message); 0: off. auto, by training "
        "rows: under `auto_small_rows` 3, under `auto_off_from` 1, from there 0 (large sets already vary their "
        "phrasing, and generation time grows with rows). See docs/augmentation.md.",
    )
    auto_small_rows: int = Field(100, ge=1, description="n auto: below this many training rows, `auto_small_n` paraphrases per prompt.")
    auto_small_n: int = Field(3, ge=0, description="n auto: paraphrases per prompt for small sets (under auto_small_rows).")
    auto_n: int = Field(1, ge=0, description="n auto: paraphrases per prompt from auto_small_rows to auto_off_from rows.")
    auto_off_from: int = Field(1000, ge=1, description="n auto: from this many training rows, no paraphrases.")
    max_rows: int | None = Field(
        None,
        ge=0,
        description="At most this many training rows get paraphrased (spread over distinct answers first); None: all.",
    )
    min_similarity: float = Field(
        0.75,
        ge=-1,
        le=1,
        description="A paraphrase is kept only when its all-MiniLM-L6-v2 cosine similarity to the original prompt is "
        "at least this (it still asks the same thing).",
    )
    max_similarity: float = Field(
        0.97,
        ge=-1,
        le=1,
        description="... and below this (it is not a near-identical copy; character n-gram copies are also caught by "
        "validate.near_dup_threshold).",
    )
    temperature: float = Field(
        0.8, ge=0, description="Sampling temperature of paraphrases (0: greedy, which gives one variant at most)."
    )
    max_length_ratio: float = Field(
        2.5, gt=0, description="Longest accepted paraphrase, in tokens, as a multiple of the original prompt's."
    )
    prompt: str = Field(
        "Rewrite the following question so that it asks exactly the same thing in different words. Keep every "
        "name, number, date and time. Reply with the rewritten question only.\n\nQuestion: {question}",
        description="Instruction sent to the generator; `{question}` is the training prompt.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "ParaphraseConfig":
        if self.min_similarity >= self.max_similarity:
            raise ValueError(f"min_similarity ({self.min_similarity}) must be below max_similarity ({self.max_similarity})")
        if "{question}" not in self.prompt:
            raise ValueError("prompt must contain {question} (where the training prompt goes)")
        return self


class AugmentConfig(_Section):
    enabled: bool = Field(
        False,
        description="Self-distillation and paraphrase of training rows (off: pass-through, and the log says so). "
        "Generation takes minutes on a CPU, so it is switched on explicitly; `self_distill` and `paraphrase.n` then "
        "choose by dataset size. Rows sent by score.outlier_action=augment are rewritten either way.",
    )
    self_distill: Literal["auto", "on", "off", "replace", "add"] = Field(
        "auto",
        description="Self-distillation: the generator rewrites each gold answer in its own words; an equivalent "
        "rewrite replaces the gold row (replace) or joins it as a new row (add); otherwise the gold row stays. auto, "
        "by training rows: off when every row has a label (the answers are labels), add under "
        "`self_distill_add_below` rows, replace under `self_distill_off_from`, off from there. on: add or replace "
        "as auto chooses, never off. See docs/augmentation.md.",
    )
    self_distill_add_below: int = Field(
        1000, ge=1, description="self_distill auto: add rewrites as new rows below this many training rows (else replace)."
    )
    self_distill_off_from: int = Field(
        20_000, ge=1, description="self_distill auto: no self-distillation from this many training rows (generation time)."
    )
    self_distill_max_rows: int | None = Field(
        None,
        ge=0,
        description="At most this many training rows get a rewrite attempt (score outliers first, then spread over "
        "distinct answers); None: all.",
    )
    self_distill_temperature: float = Field(0.0, ge=0, description="Sampling temperature of rewrites (0: greedy).")
    self_distill_max_length_ratio: float = Field(
        1.5,
        gt=0,
        description="Longest accepted rewrite, in tokens, as a multiple of the gold answer's (a rewrite that rambles "
        "on has usually stopped rewriting); generation stops there, which also bounds its time.",
    )
    length_slack_tokens: int = Field(
        8,
        ge=0,
        description="Tokens allowed beyond the length ratios (self_distill_max_length_ratio, paraphrase.max_length_ratio) (short answers and labels need room to be rephrased); "
        "generation stops there, and a rewrite cut off by it is rejected.",
    )
    max_new_tokens: int = Field(256, ge=1, description="Longest generation for any row, in new tokens.")
    self_distill_prompt: str = Field(
        "Here is a question and a reference answer.\n\nQuestion: {question}\n\nReference answer: {answer}\n\n"
        "Rewrite the reference answer in your own words. Keep every fact, number, name, date and time exactly as "
        "given, and add nothing new. Reply with the rewritten answer only.",
        description="Instruction sent to the generator for a rewrite; `{question}` is the last user message, "
        "`{answer}` the gold answer. The row's system message (if any) is kept.",
    )
    short_answer_words: int = Field(
        40,
        ge=1,
        description="Equivalence: a gold answer of at most this many words that holds key facts (numbers, prices, "
        "times, dates, names) is a short factual answer: its rewrite must keep every key fact and add no figure the "
        "gold answer and prompt lack.",
    )
    similarity_threshold: float = Field(
        0.85,
        ge=-1,
        le=1,
        description="Equivalence for text answers (all but labelled rows): the rewrite's all-MiniLM-L6-v2 cosine "
        "similarity to the gold answer must be at least this. Labelled rows instead keep their label.",
    )
    reject_phrases: list[str] = Field(
        ["reference answer", "rewritten", "rephrased", "paraphrase", "rewrite", "the question", "your question",
         "original question", "as an ai", "i'm sorry"],
        description="A rewrite or paraphrase that contains one of these (ignoring case) while its original does not "
        "is rejected: it talks about the instruction instead of carrying it out, as small models often do.",
    )
    paraphrase: ParaphraseConfig = Field(ParaphraseConfig(), description="Paraphrases of training prompts.")
    generator: GeneratorConfig = Field(GeneratorConfig(), description="The model that writes rewrites and paraphrases.")
    max_new_rows: int = Field(
        5000,
        ge=0,
        description="Budget: augmented rows in the output (replacing rewrites included); generation stops once this "
        "many have passed every filter.",
    )
    max_seconds: float = Field(
        1800.0,
        gt=0,
        description="Budget: generation time of the stage; no batch is started that would end past it (judged from "
        "the batches before); what passed is kept, and the report says where it stopped.",
    )
    score_rewrites: bool = Field(
        True,
        description="Report the base model's perplexity of kept rewrites against their gold rows (one forward pass "
        "over them).",
    )
    seed: int = Field(0, description="Seed of sampled generation.")
    examples_in_report: int = Field(3, ge=0, description="Kept and rejected examples per technique in the report.")

    @field_validator("self_distill", mode="before")
    @classmethod
    def _yaml_switch(cls, v: Any) -> Any:
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML reads on/off as booleans

    @model_validator(mode="after")
    def _prompt_fields(self) -> "AugmentConfig":
        if "{answer}" not in self.self_distill_prompt:
            raise ValueError("self_distill_prompt must contain {answer} (where the gold answer goes; {question} is optional)")
        return self


class TrainConfig(_Section):
    method: Literal["auto", "lora", "qlora", "prefix", "ia3", "full"] = Field(
        "auto",
        description="Fine-tuning method. auto: by training-set size (under 100,000 rows LoRA, which matches or beats "
        "full fine-tuning on small data and forgets less; from 100,000 rows `full`), QLoRA instead of LoRA on a GPU "
        "too small for the bf16 weights. qlora: LoRA on a 4-bit NF4 base (CUDA only). prefix: trainable virtual "
        "tokens. ia3: learned rescaling vectors. full: every weight of the transformer blocks (token embeddings "
        "frozen); with `lora_top_layers` only the top N blocks (partial fine-tuning).",
    )
    full_from_rows: int = Field(
        100_000, ge=1, description="method auto: full fine-tuning from this many training rows (below: LoRA)."
    )
    qlora_above_gpu_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="method auto on CUDA: QLoRA when the bf16 weights alone take more than this share of the GPU's "
        "memory (activations, adapter optimizer state and the CUDA context need the rest).",
    )
    full_bytes_per_param: float = Field(
        16.0,
        gt=0,
        description="method auto on CUDA: memory per weight that full fine-tuning needs (bf16 weights and gradients, "
        "fp32 AdamW moments and master copy); when that does not fit, LoRA is used instead.",
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA path (0.1-0.2 for small data).")
    target_modules: list[str] | str = Field(
        "all-linear", description="Modules that get adapters; `all-linear` = every linear layer but the output head."
    )
    lora_top_layers: int | None = Field(
        None,
        ge=1,
        description="Adapt only the top N transformer layers (None: all); applies to lora, qlora, ia3 and full. The "
        "backward pass then stops there: several times cheaper on a CPU, at some cost in capacity.",
    )
    prefix_tokens: int = Field(16, ge=1, description="method prefix: virtual tokens prepended at every layer.")
    learning_rate: float | Literal["auto"] = Field(
        "auto",
        description="Peak learning rate. auto: 2e-4 for lora/qlora (few, freshly initialised weights: 1e-4..3e-4 is "
        "usual), 3e-3 for ia3 and 1e-2 for prefix (only scaling vectors / virtual tokens train), 2e-5 for full "
        "(5e-6..5e-5 is the usual range); times `incremental_lr_factor` when starting from an existing adapter.",
    )
    incremental_lr_factor: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Learning-rate factor in incremental mode (`init_adapter` set, learning_rate auto): full "
        "fine-tuning then runs at 2e-6, inside the 1e-6..5e-6 usually advised for updating a tuned model; adapters "
        "get the same one-tenth of their fresh rate.",
    )
    epochs: float | Literal["auto"] = Field(
        "auto",
        description="Passes over the training rows (early stopping may end sooner). auto: enough passes to show "
        "`epochs_target_examples` examples, kept within [epochs_min, epochs_max] (2-3 for large sets, up to 25 for "
        "tiny ones, where early stopping and the over-memorization guard end training).",
    )
    epochs_target_examples: int = Field(
        3000, ge=1, description="epochs auto: examples to show in all (e.g. 250 rows -> 12 epochs, 1,500 rows -> 2)."
    )
    epochs_min: float = Field(2.0, gt=0, description="epochs auto: fewest passes (2-3 epochs are typical).")
    epochs_max: float = Field(25.0, gt=0, description="epochs auto: most passes (20-25 only with early stopping).")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (None: as many as `epochs` gives)."
    )
    batch_size: int = Field(8, ge=1, description="Micro-batch size per device (1-8 is usual with accumulation).")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    length_group_batches: int = Field(
        50,
        ge=1,
        description="Length-grouped batching: each epoch's shuffled rows are cut into groups of up to this many "
        "micro-batches (at least 4 groups an epoch, for randomness), sorted by length inside a group, and the "
        "batches shuffled, so padding stays small. 1 = plain shuffled order.",
    )
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Share of steps spent warming the learning rate up (a share, not 100-500 steps: small data "
        "trains for fewer steps than that).",
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (0.01-0.05).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    evals_per_epoch: int = Field(2, ge=1, description="Evaluations (and checkpoints) per epoch.")
    early_stopping_patience: int = Field(
        3,
        ge=1,
        description="Evaluations without validation-loss improvement before stopping (2-3 is usual; 3 because a "
        "plateau needs more evidence than the steady rise the over-memorization guard watches for).",
    )
    overmemorization_patience: int = Field(
        2,
        ge=1,
        description="Over-memorization guard: stop when the validation slice's perplexity has risen at this many "
        "evaluations in a row, even while other signals look flat.",
    )
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of training rows held out for early stopping (the eval set stays untouched)."
    )
    replay_fraction: float | Literal["auto"] = Field(
        "auto",
        description="Share of the training mix made of general-text replay rows (from `data.replay`, else from a "
        "part of `data.probe`), against forgetting. auto: `replay_auto_fraction` below `replay_auto_below_rows` "
        "training rows (small data forgets most), else 0.",
    )
    replay_auto_fraction: float = Field(0.1, ge=0, lt=1, description="replay_fraction auto: the share used for small data.")
    replay_auto_below_rows: int = Field(
        10_000, ge=1, description="replay_fraction auto: replay is on below this many training rows."
    )
    replay_probe_share: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Without `data.replay`: share of the probe rows set aside (by a seeded hash of their ids) as "
        "the replay pool; forgetting is then measured on the other rows only.",
    )
    init_adapter: str | None = Field(
        None,
        description="Incremental mode: start from this adapter instead of a fresh one — a PEFT adapter folder, or "
        "`champion` for the registered model's current champion (none yet: a fresh adapter).",
    )
    num_processes: int = Field(
        1, ge=1, description="Training processes (one per GPU); above 1 the train stage runs under `accelerate launch`."
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With num_processes > 1: data parallel (ddp) or fully sharded (fsdp) training."
    )
    seed: int = Field(42, description="Seed for adapter init, dropout, data order and the validation slice.")
    report_to: list[Literal["none", "tensorboard", "wandb"]] = Field(
        ["none"],
        description="Training-curve trackers besides MLflow: tensorboard (event files in the run folder's "
        "`tensorboard/`), wandb (Weights & Biases; offline mode unless WANDB_API_KEY is set, `wandb sync` uploads "
        "later). Optional packages: pip install 'fewtune[tracking]'.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, v: Any) -> Any:
        """`--set train.report_to=tensorboard` gives one name; `none` only alone."""
        v = [v] if isinstance(v, str) else v
        if isinstance(v, list) and "none" in v and len(v) > 1:
            raise PydanticCustomError("report_to", "`none` cannot be combined with a tracker; list tensorboard and/or wandb")
        return v

    @field_validator("learning_rate", "epochs", "replay_fraction", mode="before")
    @classmethod
    def _auto_or_number(cls, v: Any, info) -> Any:
        """`auto` or a number (one clear message instead of one per branch of the union)."""
        if v == "auto":
            return v
        number = None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            number = float(v)
        elif isinstance(v, str):
            try:
                number = float(v)  # YAML reads 1e-4 (no dot) as text
            except ValueError:
                pass
        if number is None:
            raise PydanticCustomError("auto_or_number", "Input should be a valid number or `auto`")
        low_ok = number >= 0 if info.field_name == "replay_fraction" else number > 0
        if not low_ok or (info.field_name == "replay_fraction" and number >= 1):
            bounds = "in [0, 1)" if info.field_name == "replay_fraction" else "greater than 0"
            raise PydanticCustomError("auto_or_number", f"Input should be `auto` or a number {bounds}")
        return number


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


class RunConfig(_Section):
    name: str | None = Field(None, description="Run folder name; default: <config name>-<UTC timestamp>.")
    runs_dir: str = Field("runs", description="Folder that holds run folders (relative to the current folder).")
    refresh_cache: bool = Field(False, description="Recompute every stage even when a cached result matches.")
    task_runner: Literal["thread", "dask"] = Field(
        "thread",
        description="Where score and augment run: `thread` (in the flow's process) or `dask` (training rows split "
        "into `dask_shards` shards, one task each, on a Dask cluster).",
    )
    dask_address: str | None = Field(
        None, description="Scheduler of an existing Dask cluster (e.g. tcp://10.0.0.5:8786); None: a local cluster per run."
    )
    dask_workers: int = Field(2, ge=1, description="Workers of the local Dask cluster (when dask_address is None).")
    dask_processes: bool = Field(
        False, description="Local cluster workers as processes (true) or threads of the flow's process (false: less memory)."
    )
    dask_shards: int = Field(2, ge=1, description="Shards the training rows are split into for score and augment on Dask.")


def _valid_cron(value: str) -> str:
    from prefect.schedules import Cron  # the same check the Prefect server applies

    try:
        Cron(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a cron expression Prefect accepts; e.g. '0 2 * * *' is 02:00 every day") from None
    return value


class ServeConfig(_Section):
    cron: str = Field("0 2 * * *", description="When the `nightly` deployment runs (cron: minute hour day month weekday).")
    timezone: str = Field("UTC", description="IANA time zone the cron is read in, e.g. Europe/Berlin (daylight saving aware).")
    event: str = Field("fewtune.dataset.landed", description="Prefect event that starts the `dataset-landed` deployment.")
    max_concurrent_runs: int = Field(1, ge=1, description="Flow runs `fewtune serve` executes at the same time.")

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        return _valid_cron(v)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}; use an IANA name such as UTC or Europe/Berlin") from None
        return v


class WebhookConfig(_Section):
    host: str = Field("127.0.0.1", description="Address `fewtune webhook` listens on (put a TLS proxy in front).")
    port: int = Field(8787, ge=1, le=65535, description="Port `fewtune webhook` listens on.")
    secret_env: str = Field(
        "FEWTUNE_WEBHOOK_SECRET", description="Environment variable holding the shared HMAC-SHA256 secret (never in files)."
    )
    min_secret_length: int = Field(16, ge=1, description="Shortest secret the receiver accepts at start-up.")
    tolerance_s: int = Field(300, ge=1, description="Largest accepted difference between a request's timestamp and now.")
    max_body_bytes: int = Field(16_384, ge=256, description="Larger request bodies are refused (413) before parsing.")
    allowed_uris: list[str] = Field(
        [],
        description="Where landed datasets may live: absolute local folders and object-store prefixes "
        "(s3://bucket/landing/). Anything else is refused.",
    )
    state_db: str | None = Field(
        None, description="SQLite file remembering deliveries and dataset hashes; default: FEWTUNE_HOME/webhook.sqlite."
    )
    delivery_ttl_s: int = Field(
        7 * 24 * 3600, ge=1, description="How long delivery ids are remembered (must exceed tolerance_s)."
    )

    @field_validator("allowed_uris")
    @classmethod
    def _allowed(cls, v: list[str]) -> list[str]:
        for entry in v:
            if "://" not in entry and not Path(entry).is_absolute():
                raise ValueError(f"{entry!r}: local entries must be absolute folders, e.g. /data/landing")
            if ".." in entry.replace("\\", "/").split("/"):
                raise ValueError(f"{entry!r}: '..' is not allowed in an allow-list entry")
        return v


class CVConfig(_Section):
    folds: int = Field(
        1,
        ge=1,
        description="k-fold cross-validation of the training rows before the final adapter: k adapters, each trained "
        "on k-1 folds and evaluated on the held-out fold, give the mean ± spread of the task metric and of "
        "forgetting; then the final adapter trains on all rows. 1: off (k times the training time).",
    )
    seed: int = Field(0, description="Seed of the fold assignment (rows derived from one row stay in its fold).")
    suggest_below_rows: int = Field(
        500,
        ge=1,
        description="The validate stage's size advice suggests cv.folds below this many training rows (one test "
        "split of a small set gives a score that moves a lot with which rows land in it).",
    )


class HealthConfig(_Section):
    live_warnings: bool = Field(True, description="Warn in the log during training, at each evaluation, when a sign appears.")
    max_eval_ppl: float = Field(
        5.0,
        gt=1,
        description="Flag when the tuned model's perplexity of the test answers is above this (healthy in-domain "
        "text: about 1.5-4).",
    )
    max_loss_gap: float = Field(
        0.5,
        gt=0,
        description="Flag over-fitting when validation loss minus training loss ends above this many nats (0.5: "
        "validation perplexity 1.65x the training one) and the gap grew since the best validation loss or over the "
        "last `gap_window` evaluations.",
    )
    gap_window: int = Field(3, ge=1, description="Evaluations over which a widening loss gap counts as growing.")
    max_loss_rebound: float = Field(
        0.5,
        gt=0,
        description="Flag oscillation when the training loss climbs back above its lowest value so far by more than "
        "this share of the first logged loss (or becomes NaN): the learning rate is too high.",
    )
    max_loss_rise: float = Field(
        0.1,
        ge=0,
        description="Flag divergence when the last logged training loss is above the first by more than this share "
        "of it (a loss that creeps up instead of converging).",
    )
    metric_margin: float = Field(
        0.0,
        ge=0,
        description="Flag when the tuned model's primary metric is below the baseline's by more than this.",
    )
    min_trainable_tokens: int = Field(
        1000,
        ge=0,
        description="Flag when fewer answer tokens than this carry training loss per epoch (e.g. 100 one-word "
        "labels): too little signal, results swing with the seed.",
    )


class DoctorConfig(_Section):
    min_free_gib: float = Field(
        5.0, ge=0, description="`fewtune doctor`: least free disk space, in GiB, under FEWTUNE_HOME and run.runs_dir."
    )
    timeout_s: float = Field(5.0, gt=0, description="`fewtune doctor`: seconds to wait for the Prefect API and the MLflow server.")


class FewtuneConfig(_Section):
    name: str = Field("fewtune", description="Config name; used in run names and the MLflow experiment.")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    score: ScoreConfig = ScoreConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    cv: CVConfig = CVConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    health: HealthConfig = HealthConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")
    run: RunConfig = RunConfig()
    serve: ServeConfig = ServeConfig()
    webhook: WebhookConfig = WebhookConfig()
    doctor: DoctorConfig = DoctorConfig()

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ "):
            raise ValueError("use letters, digits, '-' or '_' (no spaces or slashes)")
        return v

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some config sections (used in stage cache keys)."""
        data = self.dump()
        picked = {s: data[s] for s in sections}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 1e-4, true, null, [a, b] all work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.epochs=2")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: the key needs dotted names, e.g. --set train.epochs=2")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return raw


def _looks_like_hub_id(value: str) -> bool:
    return "/" in value and not value.startswith((".", "/")) and not Path(value).suffix


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    # Sections that are not mappings are left for validation to report.
    data = raw.get("data")
    data = data if isinstance(data, dict) else {}
    for key in ("train", "eval", "probe", "replay"):
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            candidate = (base_dir / value).resolve()
            # A missing file is still resolved, so the error names the place it was looked for; only a hub id
            # (owner/name[:split]) with nothing of that name under base_dir stays as written.
            if candidate.exists() or not _looks_like_hub_id(value):
                data[key] = str(candidate)
    model = raw.get("model")
    model = model if isinstance(model, dict) else {}
    base = model.get("base")
    if isinstance(base, str) and (base.startswith(".") or base.endswith(".gguf")) and not Path(base).is_absolute():
        candidate = (base_dir / base).resolve()
        if candidate.exists():
            model["base"] = str(candidate)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FewtuneConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"config file {path} not found; pass --config FILE or omit it for the embedded demo")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data:, model:, train: ...)")
    raw.setdefault("name", path.stem)
    _resolve_paths(raw, path.parent)
    apply_overrides(raw, overrides or [])
    _resolve_paths(raw, Path.cwd())  # only paths that are still relative: those given with --set
    try:
        return FewtuneConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: invalid configuration"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            msg = "unknown key (check its spelling and section)" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {where}: {msg}")
        lines.append("See docs/configuration.md for every field and its default.")
        raise ConfigError("\n".join(lines)) from None


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md is this text; a test keeps them in sync)."""
    lines = [
        "# Configuration reference",
        "",
        "One YAML file configures a run; `configs/demo.yaml` is the embedded default. Any field can be overridden with",
        "`fewtune run --set section.field=value` (the value is parsed as YAML). Relative paths in a config file are",
        "resolved against the file's folder; paths given with `--set` against the current folder.",
        "",
        "This page is generated from `flows/config.py` (`python -m flows.config > docs/configuration.md`).",
        "",
        "| field | default | description |",
        "|---|---|---|",
    ]
    for name, field in FewtuneConfig.model_fields.items():
        if not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            default = "required" if field.is_required() else f"`{field.default}`"
            lines.append(f"| `{name}` | {default} | {field.description or ''} |")
    for name, field in FewtuneConfig.model_fields.items():
        section = field.annotation
        if not isinstance(section, type) or not issubclass(section, BaseModel):
            continue
        key = field.alias or name
        lines += ["", f"## `{key}`", "", "| field | default | description |", "|---|---|---|"]
        for sub, info in section.model_fields.items():
            fields = [(f"{key}.{sub}", info)]
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):  # a nested section
                fields = [(f"{key}.{sub}.{n}", i) for n, i in info.annotation.model_fields.items()]
            for dotted, item in fields:
                default = "required" if item.is_required() else f"`{json.dumps(item.default)}`"
                lines.append(f"| `{dotted}` | {default} | {(item.description or '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
