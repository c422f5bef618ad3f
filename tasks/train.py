"""Train a PEFT adapter (LoRA) on the validated rows with the transformers Trainer.

- Loss on assistant tokens only (labels from `encode_chat`).
- A validation slice is held out of the *training* rows for early stopping and best-checkpoint selection, so the
  eval/test set stays untouched until the evaluate stage.
- Early stopping on validation loss (`EarlyStoppingCallback`), the best checkpoint is restored at the end.
- Checkpoints live under the stage folder; a re-run after a crash resumes from the last one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flows.config import FewtuneConfig
from tasks.data import split_train_eval
from tasks.models import encode_chat, load_model, load_tokenizer, pick_device, pick_dtype

log = logging.getLogger("fewtune.train")


@dataclass
class TrainResult:
    adapter_path: str
    method: str
    train_rows: int
    validation_rows: int
    best_val_loss: float | None
    best_step: int | None
    steps: int
    epochs_run: float
    stopped_early: bool
    train_tokens: int
    tokens_per_s: float | None  # None after a resume (tokens seen before the crash are not timed)
    seconds: float
    trainable_params: int
    resumed_from: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lora_config(cfg: FewtuneConfig, n_layers: int):
    from peft import LoraConfig

    t = cfg.train
    layers = None
    targets: list[str] | str = t.target_modules
    if t.lora_top_layers:
        # Adapting only the top layers also stops the backward pass there: much cheaper on a CPU.
        layers = list(range(max(0, n_layers - t.lora_top_layers), n_layers))
        if targets == "all-linear":
            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return LoraConfig(
        r=t.lora_r,
        lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


def _encode_all(tokenizer, records: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        enc = encode_chat(tokenizer, r, max_length)
        enc["length"] = len(enc["input_ids"])
        rows.append(enc)
    return rows


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def train_adapter(
    records: list[dict[str, Any]], cfg: FewtuneConfig, base_path: str, out_dir: Path
) -> TrainResult:
    """Fine-tune an adapter on `records`; writes `out_dir/adapter`, `out_dir/train_log.json`, checkpoints."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

    t = cfg.train
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    set_seed(t.seed)
    device = pick_device()
    dtype = pick_dtype(cfg.model.dtype, device)

    train_rows, val_rows = split_train_eval(records, t.validation_fraction, t.seed)
    if not val_rows:
        raise ValueError("too few training rows to hold out a validation slice for early stopping")
    tokenizer = load_tokenizer(base_path)
    train_ds = Dataset.from_list(_encode_all(tokenizer, train_rows, cfg.model.max_length))
    val_ds = Dataset.from_list(_encode_all(tokenizer, val_rows, cfg.model.max_length))

    model = load_model(base_path, dtype=dtype, device=device)
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(cfg, model.config.num_hidden_layers))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d on %s: %d trainable parameters", t.lora_r, t.target_modules, trainable)

    per_step = t.batch_size * t.gradient_accumulation
    steps_per_epoch = max(1, math.ceil(len(train_rows) / per_step))
    eval_every = max(1, steps_per_epoch // t.evals_per_epoch)
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size * 2,
        gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        eval_strategy="steps",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=eval_every,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=max(1, eval_every // 2),
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        report_to=[],
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=device == "cpu",
        bf16=device == "cuda" and dtype == torch.bfloat16,
        fp16=device == "cuda" and dtype == torch.float16,
        dataloader_num_workers=0,
        save_only_model=False,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience)],
    )
    resume = _last_checkpoint(ckpt_dir)
    if resume:
        log.info("resuming training from %s", resume)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start

    adapter_dir = out_dir / "adapter"
    trainer.model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    _pin_base_path(adapter_dir, base_path)

    state = trainer.state
    history = state.log_history
    (out_dir / "train_log.json").write_text(json.dumps(history, indent=2))
    planned_steps = state.max_steps
    tokens = int(state.num_input_tokens_seen or 0)
    best_step = None
    if state.best_model_checkpoint:
        best_step = int(Path(state.best_model_checkpoint).name.split("-")[-1])
    result = TrainResult(
        adapter_path=str(adapter_dir),
        method=t.method,
        train_rows=len(train_rows),
        validation_rows=len(val_rows),
        best_val_loss=state.best_metric,
        best_step=best_step,
        steps=state.global_step,
        epochs_run=round(state.epoch or 0.0, 3),
        stopped_early=state.global_step < planned_steps,
        train_tokens=tokens,
        tokens_per_s=round(tokens / seconds, 1) if seconds and not resume else None,
        seconds=round(seconds, 1),
        trainable_params=trainable,
        resumed_from=resume,
    )
    (out_dir / "train_result.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result


def _pin_base_path(adapter_dir: Path, base_path: str) -> None:
    """PEFT stores the base path as given; store it absolute so the adapter loads from any folder."""
    cfg_file = adapter_dir / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    local = Path(base_path)
    if local.exists():
        data["base_model_name_or_path"] = str(local.resolve())
    cfg_file.write_text(json.dumps(data, indent=2))
