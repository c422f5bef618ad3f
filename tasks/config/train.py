"""Section `train`: the PEFT method, hyper-parameters, replay, early stopping, resume."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from tasks.config.base import _Section


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
    label_learning_rate: float = Field(
        1e-3,
        gt=0,
        description="Labelled rows (every training row has a label), LoRA: the learning rate where `learning_rate` is "
        "left at auto. A label answer has a few tokens: the adapter gets little signal per row and needs a larger step "
        "(measured on CLINC150 tasks: docs/benchmarks.md).",
    )
    label_epochs: float = Field(
        6.0,
        gt=0,
        description="Labelled rows: the epochs where `epochs` is left at auto; early stopping and the "
        "over-memorization guard end sooner (CLINC150 banking: stopped after 4.3 of 6, test accuracy 0.891 against "
        "0.853 after 3; docs/training.md).",
    )
    label_lora_top_layers: int | None = Field(
        10,
        ge=1,
        description="Labelled rows, LoRA: `lora_top_layers` where it is left unset: the label is decided from the top "
        "layers' features, and the backward pass stops there (several times cheaper on a CPU). null: all layers.",
    )
    label_batch_size: int = Field(
        16, ge=1, description="Labelled rows: `batch_size` where it is left at its default (short rows batch cheaply)."
    )
    share_prefix_min_tokens: int = Field(
        16,
        ge=0,
        description="A micro-batch whose rows start with the same tokens that carry no loss (a system prompt, a label "
        "list) runs that part once and reuses its keys and values for every row, when it is at least this many tokens "
        "long: same loss and gradients, less compute (labelled rows with a label list: most of each row); a "
        "micro-batch mixing rows that start differently (replay rows among labelled rows) runs each group of alike "
        "rows this way. 0: off. "
        "Not used with prefix tuning or gradient checkpointing (QLoRA).",
    )
    trained_token_loss: bool = Field(
        True,
        description="Compute the output head and the loss only on the tokens training learns (the answer), not on "
        "every position: same loss (checked against the model's own forward on the first row), less compute and "
        "memory (a 49k-word head on a 40-token row whose answer is 4 tokens). false: the model's plain forward.",
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
        description="Share of the training mix made of general replay rows, against forgetting: from `data.replay`, "
        "else on-policy (the base model's own answers to general prompts that ship with fewtune; never probe rows). "
        "auto: `replay_auto_fraction` (labelled rows: `label_replay_auto_fraction`) below `replay_auto_below_rows` "
        "training rows (small data forgets most), else 0.",
    )
    replay_auto_fraction: float = Field(0.1, ge=0, lt=1, description="replay_fraction auto: the share used for small data.")
    label_replay_auto_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Labelled rows: `replay_auto_fraction` where it is left at its default. A label task's short "
        "answers pull general answers toward its format (`capital` for a capital city question), and the general rows "
        "hold the model to the base model's longer answers (CLINC150: accuracy 0.978 against 0.958 on travel with "
        "0.1; docs/benchmarks.md).",
    )
    replay_auto_below_rows: int = Field(
        10_000, ge=1, description="replay_fraction auto: replay is on below this many training rows."
    )
    replay_loss: Literal["tokens", "kl"] = Field(
        "kl",
        description="What replay rows are trained toward: `kl`, learning without forgetting: KL(base ‖ tuned) of the "
        "next-token distributions at their answer positions, the frozen base model's over the full vocabulary as the "
        "target (one extra forward of the replay rows without gradient; on CLINC150 banking general-text perplexity "
        "+0.4% instead of +39%, accuracy 0.891 instead of 0.882, docs/benchmarks.md); `tokens`, the cross-entropy of "
        "their answer tokens (the base model's greedy answers with on-policy replay). Not for method full.",
    )
    replay_max_new_tokens: int = Field(
        64,
        ge=1,
        description="On-policy replay (no `data.replay`): most tokens of the base model's greedy answer to each replay "
        "prompt (answered `batch_size` at a time before training; 64 keeps the answers whole sentences and the "
        "generation to seconds on a CPU for the ~25 prompts of a 250-row set).",
    )
    replay_overlap_threshold: float = Field(
        0.6,
        gt=0,
        le=1,
        description="Replay rows that nearly repeat the general-ability probe stop the run: a replay prompt and a probe "
        "question (or `data.probe` prompt), or a replay answer and a probe passage (or `data.probe` answer), with at "
        "least this Jaccard similarity of character n-grams (validate.shingle_size; case and punctuation ignored) "
        "and the same numbers. Lower than validate.near_dup_threshold because a prompt of the same template is "
        "enough to teach what the probe measures (`capital of Japan` vs `capital of France`: 0.66).",
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
